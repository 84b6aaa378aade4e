"""Worker processes that train side by side, each on its own device.

``m3net cv --devices cuda:0,cuda:1`` trains the folds two at a time, one per GPU;
``m3net benchmark accuracy --jobs N`` trains N rows at a time on one device. Both hand
their work to a :class:`DevicePool`: ``len(devices)`` worker processes, and never more
calls under way than devices. Entries may repeat: ``["cpu", "cpu"]`` splits the cores
between two workers, ``["cuda"] * 4`` puts four small models on one GPU. Each call runs
with a free device as the keyword argument ``device``.

Processes are spawned, not forked: CUDA cannot start in a forked child, and forking torch's
thread pools can deadlock. Each worker gets (usable cores) // ``len(devices)`` torch
threads and ignores Ctrl-C: the main process takes it, stops every worker and re-raises.
The first call that fails stops the others the same way. Training runs write their
checkpoints atomically, so a stopped run resumes from its last finished epoch.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from m3netcore.errors import M3NetInputError

Key = TypeVar("Key")
Call = tuple[Key, Callable[..., Any], tuple, dict]  # (key, function, args, kwargs)


def parse_devices(text: str) -> list[str]:
    """``--devices``: a comma-separated list (``cuda:0,cuda:1``, ``cpu,cpu``) or ``all`` (every visible GPU).

    Raises:
        M3NetInputError: an unknown device, a GPU that is not there, or ``all`` without GPUs.
    """
    import torch

    from m3netcore.predict import resolve_device

    if text.strip().lower() == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise M3NetInputError("--devices all: no CUDA GPU is available")
        return [f"cuda:{index}" for index in range(count)]
    entries = [entry.strip().lower() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise M3NetInputError(f"--devices: a comma-separated list of devices or 'all', not {text!r}")
    for entry in entries:
        if entry == "auto":
            raise M3NetInputError("--devices: name each device (cpu, cuda, cuda:N); 'auto' is not one")
        device = resolve_device(entry)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise M3NetInputError(f"--devices: {entry} is not there; this machine has {count} GPU(s)")
    return entries


class DevicePool:
    """``len(devices)`` spawned worker processes that run calls, each call on a device no other call holds.

    Example:
        >>> calls = [(fold, train_run, (data, "m3net", fold, out / f"fold-{fold}"), {}) for fold in range(5)]
        >>> with DevicePool(["cuda:0", "cuda:1"]) as pool:
        ...     for fold, summary in pool.run(calls):
        ...         print(fold, summary["test_auc"])
    """

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("a DevicePool needs at least one device")
        self.devices = list(devices)
        threads = max(1, _usable_cores() // len(self.devices))
        self._executor = ProcessPoolExecutor(len(self.devices), mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(threads,))  # fmt: skip

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def run(self, calls: Sequence[Call]) -> Iterator[tuple[Key, Any]]:
        """``(key, function(*args, device=..., **kwargs))`` of each call, as they finish.

        Raises:
            Exception: the first call's that fails, after the other calls are stopped.
            ChildProcessError: a worker process died (killed, or out of memory).
        """
        free = collections.deque(self.devices)
        waiting = collections.deque(calls)
        running: dict[Future, tuple[Key, str]] = {}
        try:
            while waiting or running:
                while waiting and free:
                    key, function, args, kwargs = waiting.popleft()
                    device = free.popleft()
                    running[self._executor.submit(_call_on, device, function, args, kwargs)] = (key, device)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key, device = running.pop(future)
                    free.append(device)
                    yield key, future.result()
        except BrokenProcessPool as err:
            self._stop_workers()
            raise ChildProcessError(
                "a worker process died (killed, or out of memory?); finished work is kept, run again to continue"
            ) from err
        except BaseException:
            self._stop_workers()
            raise

    def _stop_workers(self) -> None:
        # ProcessPoolExecutor cannot cancel a call under way (Python < 3.14 has no terminate_workers)
        for process in list(getattr(self._executor, "_processes", {}).values()):
            process.terminate()
        self._executor.shutdown(wait=True, cancel_futures=True)


def tagged_print(tag: str, line: str) -> None:
    """A worker's progress line on stdout, prefixed with what it works on (picklable, unlike a closure)."""
    print(f"[{tag}] {line}", flush=True)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_worker(threads: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(threads)  # the cores shared by the workers


def _call_on(device: str, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(torch.device(device))  # what uses "the current GPU" uses this one
    return function(*args, device=device, **kwargs)
