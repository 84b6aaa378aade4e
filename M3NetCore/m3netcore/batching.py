"""One network thread per process, fed by several reading threads: nodules of several CTs per forward pass.

``m3net predict-many`` runs each worker process with a few task threads. Each thread reads
its CT, cuts the crops around its points (SimpleITK and numpy, which release the GIL) and
hands them to the process's :class:`NoduleBatcher`; the batcher's one thread runs the
network on everything handed in since its last forward pass, several CTs at once, and
gives each thread its own results back. So reading the next CT overlaps with inference
on the current one, and on a GPU the forward passes are as full as the readers can make
them::

    batcher = NoduleBatcher(load_model("demo"), device="cuda")
    for result in batcher.iter_predict(image, points):   # from any number of threads
        ...
    batcher.close()

A nodule's answer depends on its own crops only (the network is in eval mode), so the
answer is the same whatever shares its forward pass (to the last bits of floating point).
Only the batcher's thread touches the network, so Grad-CAM's hooks never meet each other.
If a forward pass of several CTs fails, each CT is run again alone, so that the error is
that CT's only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from m3netcore.checkpoint import Model
from m3netcore.predict import DEFAULT_CHUNK, NoduleResult, checked_points, crop_batch, resolve_device, run_network

GPU_BATCH = 4 * DEFAULT_CHUNK  # nodules per forward pass on a GPU, from as many CTs as are waiting


@dataclass
class _Request:
    crops: dict[str, np.ndarray]
    points: list[tuple[float, float, float]]
    answer: Future


class NoduleBatcher:
    """Runs ``model`` for every thread of this process, in forward passes of up to ``max_nodules``.

    Args:
        model: a loaded model; the batcher's thread is the only one that should run it.
        device: "auto", "cpu", "cuda" or "cuda:N".
        explain: compute the Grad-CAM heatmaps.
        max_nodules: nodules gathered into one forward pass (default 16 on a CPU, 64 on a GPU);
            a request (one CT's chunk of up to 16) is never split, so a pass may hold up to 15 more.
    """

    def __init__(self, model: Model, *, device: str | torch.device = "auto", explain: bool = True,
                 max_nodules: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.device = resolve_device(device)
        self.explain = explain
        self.max_nodules = max_nodules or (GPU_BATCH if self.device.type == "cuda" else DEFAULT_CHUNK)
        self.passes = 0  # forward passes run (the tests read how requests were grouped)
        self.largest_pass = 0  # most CTs' requests in one pass
        self.failed_shared_passes = 0  # passes of several CTs that failed, whose CTs were then run alone
        self.stopped_by: BaseException | None = None  # what stopped the network thread, if anything did
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="m3net-network", daemon=True)
        self._thread.start()

    def iter_predict(self, image: sitk.Image, points: Iterable[Sequence[float]], *, coords: str = "LPS",
                     chunk_size: int = DEFAULT_CHUNK) -> Iterator[NoduleResult]:  # fmt: skip
        """:func:`m3netcore.predict.iter_predict` through this batcher: crops cut in the calling thread.

        Every check is made before the first result, as there. Meant for the calling thread
        to run while other threads read their CTs; the crops of the next chunk are cut while
        the network runs the current one.
        """
        points_lps = checked_points(self.model, image, points, coords=coords, explain=self.explain)
        return self._results(image, points_lps, chunk_size)

    def submit(self, crops: dict[str, np.ndarray], points_lps: Sequence[Sequence[float]]) -> Future:
        """Hand stacked crops (:func:`m3netcore.predict.crop_batch`) to the network thread; the future gives
        their results, one per point."""
        answer: Future = Future()
        with self._closing:  # a request is never queued behind the end
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the batcher is closed")
            self._requests.put(_Request(crops, [tuple(map(float, p)) for p in points_lps], answer))
        return answer

    def close(self) -> None:
        """Stop the network thread once the requests handed in before are answered."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._requests.put(None)
        self._thread.join()

    # --- private ---------------------------------------------------------------------------

    def _results(self, image: sitk.Image, points_lps: list, chunk_size: int) -> Iterator[NoduleResult]:
        chunks = [points_lps[start : start + chunk_size] for start in range(0, len(points_lps), chunk_size)]
        pending = self.submit(crop_batch(image, chunks[0], self.model), chunks[0]) if chunks else None
        for number in range(len(chunks)):
            following = None
            if number + 1 < len(chunks):  # cut the next chunk's crops while this one is in the network
                following = self.submit(crop_batch(image, chunks[number + 1], self.model), chunks[number + 1])
            yield from pending.result()
            pending = following

    def _serve(self) -> None:
        group: list[_Request] = []
        try:
            while True:
                first = self._requests.get()
                if first is None:
                    return
                group, count, closing = [first], len(first.points), False
                while count < self.max_nodules:
                    try:
                        more = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        closing = True
                        break
                    group.append(more)
                    count += len(more.points)
                self._answer(group)
                group = []
                if closing:
                    return
        except BaseException as err:  # noqa: BLE001 - no thread may wait for an answer that will not come
            with self._closing:
                self._closed = True
            left = [*group]
            while True:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is not None:
                    left.append(request)
            self.stopped_by = err  # told to every request; the thread then ends quietly
            for request in left:
                _settle(request.answer, error=RuntimeError(f"the network thread stopped: {err!r}"))

    def _answer(self, group: list[_Request]) -> None:
        try:
            crops = group[0].crops if len(group) == 1 else {
                name: np.concatenate([request.crops[name] for request in group]) for name in group[0].crops
            }  # fmt: skip
            results = run_network(self.model, crops, [p for request in group for p in request.points],
                                  explain=self.explain, device=self.device)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - handed to the thread that asked
            if len(group) == 1:
                _settle(group[0].answer, error=err)
            else:  # whose error it is: each request alone
                self.failed_shared_passes += 1
                for request in group:
                    self._answer([request])
            return
        self.passes += 1
        self.largest_pass = max(self.largest_pass, len(group))
        start = 0
        for request in group:
            _settle(request.answer, result=results[start : start + len(request.points)])
            start += len(request.points)


def _settle(answer: Future, *, result=None, error: BaseException | None = None) -> None:
    """Answer a request unless it was answered or cancelled already."""
    if answer.done():
        return
    try:
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)
    except InvalidStateError:  # cancelled between the look and the answer
        pass


__all__ = ["GPU_BATCH", "NoduleBatcher"]
