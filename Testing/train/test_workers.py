"""DevicePool: never two calls on one device, the first failure stops the rest, a dead worker is one error."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from m3netcore.errors import M3NetInputError
from m3netcore.evaluation.workers import DevicePool, parse_devices


def _hold(seconds: float, *, device: str) -> tuple[str, float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return device, start, time.monotonic()


def _fail(*, device: str) -> None:
    raise M3NetInputError(f"bad fold on {device}")


def _mark_then_hold(marker: str, seconds: float, *, device: str) -> None:
    Path(marker).touch()
    time.sleep(seconds)


def _die(*, device: str) -> None:
    os._exit(3)  # as the kernel's OOM killer would end it: no exception, no cleanup


def test_calls_run_at_most_one_per_device_and_all_finish():
    calls = [(k, _hold, (0.3,), {}) for k in range(5)]
    with DevicePool(["d0", "d1"]) as pool:
        results = dict(pool.run(calls))
    assert sorted(results) == list(range(5))
    by_device: dict[str, list[tuple[float, float]]] = {}
    for device, start, end in results.values():
        by_device.setdefault(device, []).append((start, end))
    assert set(by_device) == {"d0", "d1"}
    for spans in by_device.values():
        spans.sort()
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False))


def test_the_first_failure_stops_the_calls_under_way_and_the_waiting_ones(tmp_path):
    never = tmp_path / "never-started"
    calls = [("slow", _hold, (120.0,), {}), ("bad", _fail, (), {}), ("later", _mark_then_hold, (str(never), 0.0), {})]
    started = time.monotonic()
    with pytest.raises(M3NetInputError, match="bad fold on d1"), DevicePool(["d0", "d1"]) as pool:
        list(pool.run(calls))
    assert time.monotonic() - started < 60  # the 120 s call was stopped, not waited for
    assert not never.exists()


def test_a_worker_that_dies_is_one_error_not_a_hang():
    with pytest.raises(ChildProcessError, match="worker process died"), DevicePool(["d0"]) as pool:
        list(pool.run([("dies", _die, (), {})]))


def test_devices_are_parsed_and_checked():
    assert parse_devices("cpu, CPU") == ["cpu", "cpu"]
    for text, message in ((",", "comma-separated"), ("auto", "'auto' is not one"), ("tpu", "device must be")):
        with pytest.raises(M3NetInputError, match=message):
            parse_devices(text)
