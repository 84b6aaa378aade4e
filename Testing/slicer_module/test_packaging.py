"""The extension as Slicer builds and indexes it: every shipped file listed, names consistent.

No Slicer build tree exists here, so these read the files CMake and the ExtensionsIndex
read, and check what would break a build or an install.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from M3NetSlicerLib import dependencies

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "M3NetSlicer"
CORE = ROOT / "M3NetCore" / "m3netcore"


def cmake_list(text: str, name: str) -> list[str]:
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, f"{name} is not set"
    return [item for item in match.group(1).split() if not item.startswith("#")]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    scripts = {item.replace("${MODULE_NAME}", "M3NetSlicer") for item in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    resources = {item.replace("${MODULE_NAME}", "M3NetSlicer") for item in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk
    shipped_resources = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert resources == shipped_resources
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_core_package_is_bundled_whole():
    text = (MODULE / "CMakeLists.txt").read_text()
    bundled = set(cmake_list(text, "M3NETCORE_FILES"))
    package = {
        str(p.relative_to(CORE))
        for p in CORE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in {".py", ".json", ".safetensors"}
    }
    assert bundled == package


# The ExtensionsIndex's accepted categories (scripts/check_description_files.py, main, 2026-12).
INDEX_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
}  # fmt: skip


def cmake_value(text: str, variable: str) -> str:
    match = re.search(rf'set\({variable} "([^"]+)"\)', text)  # the index's own regex: no space before ")"
    assert match, variable
    return match.group(1)


def test_the_extensions_index_would_accept_the_description():
    """What ExtensionsIndex/scripts/check_description_files.py checks, offline."""
    index_file = ROOT / "M3NetSlicer.json"
    raw = index_file.read_bytes()
    assert b"\r" not in raw  # LF line endings
    index = json.loads(raw)
    assert index["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert set(index) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_url", "tier"}  # fmt: skip
    assert index["category"] in INDEX_CATEGORIES
    scheme, _, rest = index["scm_url"].partition("://")
    assert scheme in ("git", "https")
    repository = rest.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert repository.startswith("Slicer")  # the repository's name
    extension = index_file.stem
    assert not extension.lower().startswith("slicer")  # the extension's name must not
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"project\s*\(\s*([^\s\)\n\r]+)", top).group(1) == extension
    assert cmake_value(top, "EXTENSION_CATEGORY") == index["category"]
    assert index["build_dependencies"] == ["PyTorch"] and cmake_value(top, "EXTENSION_DEPENDS") == "PyTorch"
    # Icon and screenshots: raw URLs into the repository named by scm_url, naming PNGs that are here.
    urls = [cmake_value(top, "EXTENSION_ICONURL"), *cmake_value(top, "EXTENSION_SCREENSHOTURLS").split()]
    for url in urls:
        prefix = f"https://raw.githubusercontent.com/{rest.split('/', 1)[1].removesuffix('.git')}/main/"
        assert url.startswith(prefix), url
        path = ROOT / url.removeprefix(prefix)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
    assert cmake_value(top, "EXTENSION_HOMEPAGE").startswith(index["scm_url"].removesuffix(".git"))
    assert (ROOT / "LICENSE").is_file()


def test_extension_description_files_agree():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(M3NetSlicer)" in top
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert cmake_value(top, f"EXTENSION_{variable}")
    index = json.loads((ROOT / "M3NetSlicer.json").read_text())
    s4ext = dict(
        line.split(" ", 1) for line in (ROOT / "M3NetSlicer.s4ext").read_text().splitlines() if line and line[0] != "#"
    )
    assert s4ext["scmurl"] == index["scm_url"]
    assert s4ext["depends"] == "PyTorch"
    assert s4ext["category"] == index["category"]
    assert s4ext["iconurl"] == cmake_value(top, "EXTENSION_ICONURL")
    assert s4ext["screenshoturls"] == cmake_value(top, "EXTENSION_SCREENSHOTURLS")
    assert s4ext["homepage"] == cmake_value(top, "EXTENSION_HOMEPAGE")


def test_the_supported_slicer_versions_are_stated_alike():
    """Slicer 5.10+ (Python 3.12); the code itself runs on Python 3.10+ (checked below)."""
    readme = (ROOT / "README.md").read_text()
    assert "3D Slicer 5.10 or later" in readme and "5.8 or later" not in readme
    assert "Supported: 3D Slicer 5.10 and later" in (ROOT / "M3NetSlicer.s4ext").read_text()
    assert "Supported: Slicer 5.10 and later" in (ROOT / "CMakeLists.txt").read_text()
    pyproject = (ROOT / "M3NetCore" / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in pyproject


@pytest.mark.parametrize("icon", [ROOT / "M3NetSlicer.png", MODULE / "Resources" / "Icons" / "M3NetSlicer.png"])
def test_icons_are_128_pixel_pngs(icon):
    header = icon.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


def module_source() -> ast.Module:
    return ast.parse((MODULE / "M3NetSlicer.py").read_text())


def test_the_module_has_the_template_shape():
    classes = {node.name: node for node in module_source().body if isinstance(node, ast.ClassDef)}
    assert {
        "M3NetSlicer",
        "M3NetSlicerParameterNode",
        "M3NetSlicerWidget",
        "M3NetSlicerLogic",
        "M3NetSlicerTest",
    } <= set(classes)
    decorators = [ast.unparse(d) for d in classes["M3NetSlicerParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    # The Widget's Apply goes through tryWithErrorDisplay.
    apply = next(f for f in classes["M3NetSlicerWidget"].body if getattr(f, "name", "") == "onApplyButton")
    assert "tryWithErrorDisplay" in ast.unparse(apply)


# What parameterNodeWrapper can bind (Slicer's guiConnectors.py): widget class -> field types.
CONNECTORS = {
    "qMRMLNodeComboBox": {"vtkMRMLScalarVolumeNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLTableNode"},
    "QComboBox": {"str"},  # with Choice(...)
    "QCheckBox": {"bool"},
    "ctkSliderWidget": {"float"},
    "ctkPathLineEdit": {"pathlib.Path", "Path"},  # not str: a str field cannot bind it
}


def field_type(annotation: ast.expr) -> str:
    """``float`` for ``float`` and for ``Annotated[float, ...]``."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        return ast.unparse(annotation.slice.elts[0])
    return ast.unparse(annotation)


def test_ui_widgets_and_parameters_match_the_code():
    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "M3NetSlicer.ui")
    widgets = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "M3NetSlicer.py").read_text()))
    assert used <= widgets, f"used in code, missing in the .ui: {used - widgets}"
    classes = {node.name: node for node in module_source().body if isinstance(node, ast.ClassDef)}
    fields = {
        stmt.target.id: field_type(stmt.annotation)
        for stmt in classes["M3NetSlicerParameterNode"].body
        if isinstance(stmt, ast.AnnAssign)
    }
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) <= set(fields), f"bound in the .ui but not parameters: {set(bound) - set(fields)}"
    for name, widget_class in bound.items():
        assert fields[name] in CONNECTORS[widget_class], f"{name}: {fields[name]} cannot bind a {widget_class}"
    assert {"inputVolume", "nodules", "device", "opacity", "threshold", "perScale"} <= set(bound)


def test_nothing_is_installed_or_imported_at_module_import():
    """Module import must not import torch or the core, nor install anything."""
    source = module_source()
    top_imports = set()
    for node in source.body:
        if isinstance(node, ast.Import):
            top_imports |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_imports.add((node.module or "").split(".")[0])
    assert not top_imports & {"torch", "m3netcore", "M3NetSlicerLib", "SimpleITK", "numpy"}
    assert "pip_install" not in ast.unparse([n for n in source.body if not isinstance(n, ast.ClassDef)][0])


def test_dependencies_are_checked_without_installing():
    assert dependencies.missing() == []  # this environment has the core's packages
    assert dependencies.torch_installed()
    assert dependencies.missing(("surely-not-installed-m3net>=1", "numpy>=1.0", "numpy>=999")) == [
        "surely-not-installed-m3net>=1",
        "numpy>=999",
    ]
    asked = []
    with pytest.raises(dependencies.DependencyError, match=r"not installed under --testing\): surely-not-installed"):
        dependencies.ensure(
            testing=True, confirm=lambda message: asked.append(message) or True, requirements=("surely-not-installed",)
        )
    assert asked == []  # under --testing nobody is asked and nothing is installed
    dependencies.ensure(testing=True, confirm=lambda message: pytest.fail("asked"), requirements=("numpy",))
