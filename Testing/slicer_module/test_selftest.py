"""The module's self-test, as Slicer's build machines (no torch, ``--testing``) and users run it."""

from __future__ import annotations

import pytest
from M3NetSlicerLib import selftest


def test_on_a_build_machine_without_torch_it_passes_what_it_can_and_installs_nothing(app):
    installs = []
    messages = []
    report = selftest.run(
        app.scene,
        testing=True,
        missing=lambda: ["torch>=2.2", "safetensors>=0.4"],
        ensure_dependencies=lambda: installs.append(1),
        log=messages.append,
    )
    assert report.passed == ["panel decisions without torch"]
    assert report.skipped and "torch>=2.2, safetensors>=0.4" in report.skipped[0]
    assert messages == report.skipped
    assert installs == []


def test_a_user_without_torch_is_asked_to_install_it_then_apply_runs(app):
    installs = []
    report = selftest.run(app.scene, testing=False, missing=lambda: ["torch>=2.2"],
                          ensure_dependencies=lambda: installs.append(1), log=lambda message: None)  # fmt: skip
    assert installs == [1]
    assert report.passed == ["panel decisions without torch", "Apply on a generated CT"] and not report.skipped


def test_a_failed_check_fails_the_self_test(app, monkeypatch):
    """The checks can fail: with no bundled models listed, the test says which check broke."""
    monkeypatch.setattr(selftest, "bundled_models", lambda: [])
    with pytest.raises(selftest.SelfTestFailure, match="bundled models listed"):
        selftest.run(app.scene, testing=True, missing=lambda: [], log=lambda message: None)
