"""Python packages the module needs inside Slicer, installed only when needed and agreed to.

torch comes from the PyTorch extension (PyTorchUtils picks the build for the machine's
GPU driver). The core's other needs that Slicer does not ship (safetensors) are
installed with ``slicer.packaging.pip_ensure`` (Slicer >= 5.11) or ``slicer.util.pip_install``
after the user agrees. Nothing is installed at import time or when Slicer runs with
``--testing``; this module itself imports neither torch nor Qt at import time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

TORCH_REQUIREMENT = "torch>=2.2"
# What the bundled m3netcore imports, beside torch, and whether Slicer ships it.
REQUIREMENTS = ("numpy>=1.24", "SimpleITK>=2.3", "safetensors>=0.4")


class DependencyError(RuntimeError):
    """A package is missing and was not (or could not be) installed."""


def missing(requirements: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """The requirements that are not installed at a satisfying version."""
    return [text for text in requirements if not _satisfied(text)]


def missing_all(requirements: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """torch and the other requirements that are not installed (torch first)."""
    return ([] if torch_installed() else [TORCH_REQUIREMENT]) + missing(requirements)


def install_hint(wanted: list[str]) -> str:
    """One sentence on how to install ``wanted`` for a script run by Slicer's Python."""
    others = [r for r in wanted if r != TORCH_REQUIREMENT]
    steps = []
    if TORCH_REQUIREMENT in wanted:
        steps.append("install the PyTorch extension from the Extensions Manager and let it install torch")
    if others:
        steps.append("run slicer.util.pip_install(" + repr(" ".join(others)) + ") in Slicer's Python console")
    return "; ".join(steps) + " (or press Apply once in the M3Net module, which offers to do this)"


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None and _satisfied(TORCH_REQUIREMENT)


def ensure(*, testing: bool, confirm, log=print, requirements: tuple[str, ...] = REQUIREMENTS) -> None:
    """Make torch and the other requirements importable, asking first.

    Args:
        testing: Slicer runs with ``--testing``: install nothing, fail with the list.
        confirm: ``confirm(message) -> bool`` asks the user (a dialog in the application).
        log: where progress messages go.
        requirements: the packages beside torch.

    Raises:
        DependencyError: something is missing and could not be installed.
    """
    need_torch = not torch_installed()
    others = missing(requirements)
    if not need_torch and not others:
        return
    wanted = ([TORCH_REQUIREMENT] if need_torch else []) + others
    if testing:
        raise DependencyError(f"missing Python packages (not installed under --testing): {', '.join(wanted)}")
    if need_torch:
        try:
            import PyTorchUtils
        except ImportError as err:
            raise DependencyError("M3Net needs the PyTorch extension: install it from the Extensions Manager") from err
        log("Installing PyTorch through the PyTorch extension (first use; this may take several minutes)...")
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.2") is None:
            raise DependencyError("PyTorch was not installed; M3Net cannot run without it")
    if others:
        _pip_install(others, confirm=confirm, log=log)
    still = ([TORCH_REQUIREMENT] if not torch_installed() else []) + missing(requirements)
    if still:
        raise DependencyError(f"still missing after installation: {', '.join(still)} (restart Slicer and try again)")


def _pip_install(requirements: list[str], *, confirm, log) -> None:
    import slicer

    packaging_module = getattr(slicer, "packaging", None)
    if packaging_module is not None and hasattr(packaging_module, "pip_ensure"):
        from packaging.requirements import Requirement

        packaging_module.pip_ensure([Requirement(r) for r in requirements], requester="M3Net")
        return
    message = (
        "M3Net needs these Python packages: " + ", ".join(requirements) + ".\n\n"
        "Install them now? This needs a network connection."
    )
    if not confirm(message):
        raise DependencyError(f"installation declined; M3Net needs {', '.join(requirements)}")
    log(f"Installing {', '.join(requirements)}...")
    slicer.util.pip_install(" ".join(f'"{r}"' if " " in r else r for r in requirements))


def _satisfied(requirement: str) -> bool:
    name, minimum = _split(requirement)
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return minimum is None or _version_tuple(version) >= _version_tuple(minimum)


def _split(requirement: str) -> tuple[str, str | None]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*", requirement)
    if match is None:
        raise ValueError(f"unsupported requirement {requirement!r} (use 'name' or 'name>=version')")
    return match.group(1), match.group(2)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in re.split(r"[.+]", text):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)
