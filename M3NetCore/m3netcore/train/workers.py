"""Worker processes that train side by side, each on its own device.

``m3net cv --devices cuda:0,cuda:1`` trains the folds two at a time, one per GPU;
``m3net benchmark accuracy --jobs N`` trains N rows at a time on one device. Both hand
their work to a :class:`DevicePool`: one process per entry of ``devices`` (entries may
repeat: ``["cpu", "cpu"]`` splits the cores between two workers, ``["cuda"] * 4`` puts
four small models on one GPU). Each call runs with its worker's device as the keyword
argument ``device``.

Processes are spawned, not forked: CUDA cannot start in a forked child, and forking torch's
thread pools can deadlock. Each worker gets ``os.cpu_count() // len(devices)`` torch threads.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from m3netcore.errors import M3NetInputError

Key = TypeVar("Key")

_WORKER_DEVICE: str | None = None  # set in each worker process by _start_worker


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
    """A pool of ``len(devices)`` spawned worker processes, worker ``k`` on ``devices[k]``.

    Example:
        >>> with DevicePool(["cpu", "cpu"]) as pool:
        ...     futures = {pool.submit(train_run, data, "m3net", fold, out / f"fold-{fold}"): fold for fold in (0, 1)}
        ...     for fold, summary in pool.as_finished(futures):
        ...         print(fold, summary["test_auc"])
    """

    def __init__(self, devices: Sequence[str]) -> None:
        if not devices:
            raise ValueError("a DevicePool needs at least one device")
        context = multiprocessing.get_context("spawn")
        free_devices = context.SimpleQueue()
        for device in devices:
            free_devices.put(device)
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        self._executor = ProcessPoolExecutor(len(devices), mp_context=context, initializer=_start_worker,
                                             initargs=(free_devices, threads))  # fmt: skip

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, function: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """``function(*args, device=<the worker's device>, **kwargs)`` in the next free worker."""
        return self._executor.submit(_call_on_worker_device, function, args, kwargs)

    def as_finished(self, futures: dict[Future, Key]) -> Iterator[tuple[Key, Any]]:
        """``(key, result)`` of each future as it finishes; the first failure cancels the waiting calls and raises."""
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def tagged_print(tag: str, line: str) -> None:
    """A worker's progress line on stdout, prefixed with what it works on (picklable, unlike a closure)."""
    print(f"[{tag}] {line}", flush=True)


def _start_worker(free_devices: Any, threads: int) -> None:
    global _WORKER_DEVICE
    import torch

    _WORKER_DEVICE = free_devices.get()
    torch.set_num_threads(threads)  # the cores shared by the workers
    if _WORKER_DEVICE.startswith("cuda:"):
        torch.cuda.set_device(torch.device(_WORKER_DEVICE))  # what uses "the current GPU" uses this one


def _call_on_worker_device(function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return function(*args, device=_WORKER_DEVICE, **kwargs)
