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


def test_extension_description_files_agree():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(M3NetSlicer\)", top, re.M)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', top)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', top), variable
    assert "add_subdirectory(M3NetSlicer)" in top
    index = json.loads((ROOT / "M3NetSlicer.json").read_text())
    assert index["build_dependencies"] == ["PyTorch"]
    assert index["category"] == re.search(r'EXTENSION_CATEGORY "([^"]+)"', top).group(1)
    assert {"scm_url", "scm_revision", "tier", "category"} <= set(index)
    s4ext = dict(
        line.split(" ", 1) for line in (ROOT / "M3NetSlicer.s4ext").read_text().splitlines() if line and line[0] != "#"
    )
    assert s4ext["scmurl"] == index["scm_url"]
    assert s4ext["depends"] == "PyTorch"
    assert s4ext["category"] == index["category"]
    assert s4ext["iconurl"] == re.search(r'EXTENSION_ICONURL "([^"]+)"', top).group(1)
    screenshot = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', top).group(1)
    assert s4ext["screenshoturls"] == screenshot
    assert (ROOT / screenshot.split("/main/", 1)[1]).is_file()  # the URL points at a file in this repository
    assert (ROOT / "LICENSE").is_file()


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
