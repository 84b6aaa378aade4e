"""Run a script in the state ``Slicer --no-splash --no-main-window --python-script`` gives it.

What Slicer's source says that state is (5.10: qSlicerApplicationHelper.hxx,
qSlicerApplication.cxx, qSlicerCoreApplication.cxx): the application logic, the scene and
every module's logic exist, and the displayable manager factories know the application
logic; but no main window was made, so ``setLayoutManager`` never ran and the
application logic's slice and view logics are None (``GetSliceLogics()`` returns None).
The MRML objects here are Slicer's own (slicer-core); only the Qt application object,
which cannot exist without Qt, is stood in for by the few calls a script makes on it.

Usage: python no_main_window.py SCRIPT ARGS...  (the exit status is the script's)
"""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "M3NetSlicer"))

import slicer  # noqa: E402
from M3NetSlicerLib.headless import HeadlessApplication  # noqa: E402

application = HeadlessApplication.create()
application.application_logic.SetSliceLogics(None)
application.application_logic.SetViewLogics(None)
assert application.application_logic.GetSliceLogics() is None


class Application:
    """The calls a batch script makes on ``slicer.app``."""

    def applicationLogic(self):  # noqa: N802 (Slicer's name)
        return application.application_logic

    def testingEnabled(self) -> bool:  # noqa: N802
        return False


slicer.app = Application()
slicer.mrmlScene = application.scene
slicer.modules = types.SimpleNamespace(
    volumerendering=types.SimpleNamespace(logic=lambda: application.volume_rendering_logic)
)
script = sys.argv[1]
sys.argv = sys.argv[1:]  # as --python-script: the script's own arguments follow its path
runpy.run_path(script, run_name="__main__")
