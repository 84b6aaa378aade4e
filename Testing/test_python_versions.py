"""The code runs on every Python it claims: 3.10 and later (3D Slicer 5.10 ships 3.12).

Slicer 5.8 shipped Python 3.9, where ``zip(strict=True)`` and ``X | Y`` at run time fail
on every Apply: the extension supports Slicer 5.10 and later, and these tests keep the
code within Python 3.10's language and standard library.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "M3NetCore" / "m3netcore", ROOT / "M3NetSlicer"]
OLDEST = (3, 10)


def shipped_files() -> list[Path]:
    return sorted(p for folder in SHIPPED for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_vermin_finds_nothing_newer_than_python_3_10():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install vermin; `make test` installs it)")
    done = subprocess.run(
        [vermin, "--no-tips", "--violations", "--eval-annotations", f"-t={OLDEST[0]}.{OLDEST[1]}-",
         *map(str, SHIPPED)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def other_pythons() -> list[str]:
    """Interpreters 3.10+ other than this one: pyenv's (these machines have them) or on PATH."""
    found = {}
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for folder in sorted(root.glob("3.*")) if root.is_dir() else []:
        version = tuple(int(part) for part in folder.name.split(".")[:2] if part.isdigit())
        if len(version) == 2 and version >= OLDEST and version != sys.version_info[:2]:
            binary = folder / "bin" / "python3"
            if binary.is_file():
                found[version] = str(binary)
    return [found[v] for v in sorted(found)]


@pytest.mark.parametrize("python", other_pythons() or [pytest.param(None, marks=pytest.mark.skip("none here"))])
def test_every_shipped_file_compiles_on_other_pythons(python):
    """Syntax only (no packages are installed for them): each file compiles, nothing is written."""
    program = (
        "import sys\n"
        "for name in sys.argv[1:]:\n"
        "    compile(open(name, encoding='utf-8').read(), name, 'exec')\n"
        "print(sys.version_info[:2])"
    )
    done = subprocess.run([python, "-c", program, *map(str, shipped_files())], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_panels_decisions_import_without_torch_or_the_core():
    """What the module imports when it opens or a scene loads pulls in neither torch nor m3netcore."""
    program = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'M3NetSlicer')!r})\n"
        "import M3NetSlicerLib.panel, M3NetSlicerLib.scene_outputs, M3NetSlicerLib.selftest\n"
        "import M3NetSlicerLib.dependencies, M3NetSlicerLib.scene_files, M3NetSlicerLib.display\n"
        "heavy = sorted(m for m in ('torch', 'm3netcore', 'SimpleITK') if m in sys.modules)\n"
        "print(heavy)\n"
        "from M3NetSlicerLib.panel import bundled_models\n"
        "print(bundled_models())\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    heavy, models = done.stdout.splitlines()[-2:]
    assert heavy == "[]"
    assert "'demo'" in models and "'lidc-phantom'" in models
