"""m3netcore.batching: one network thread answering several reading threads, several CTs per forward pass."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk

from m3netcore import M3NetInputError, load_model, predict
from m3netcore.batching import NoduleBatcher
from m3netcore.predict import crop_batch

WAIT_S = 120  # a regression fails the test instead of hanging the suite
OFFSETS_MM = ((0.0, 0.0, 0.0), (-6.0, 8.0, 7.0), (9.0, -5.0, -4.0), (4.0, 4.0, -9.0))


@pytest.fixture(scope="module")
def model():
    return load_model("demo")


@pytest.fixture(scope="module")
def cts(small_ct, phantom) -> list[tuple[sitk.Image, list[tuple[float, float, float]]]]:
    """Four CTs: the small CT shifted by a few HU each (different answers), 1-4 points each."""
    centre = np.asarray(phantom.NODULE_LPS)
    made = []
    for n in range(4):
        image = sitk.Cast(small_ct, sitk.sitkFloat32) + float(25 * n)
        image.CopyInformation(small_ct)
        made.append((image, [tuple(float(v) for v in centre + np.asarray(o)) for o in OFFSETS_MM[: n + 1]]))
    return made


def same(ours, reference) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.point_lps == theirs.point_lps
        assert mine.probability == pytest.approx(theirs.probability, abs=1e-6)
        assert mine.scale_attention == pytest.approx(theirs.scale_attention, abs=1e-6)
        assert mine.label == theirs.label
        for scale, heatmap in theirs.heatmaps.items():
            assert mine.heatmaps[scale].GetOrigin() == heatmap.GetOrigin()
            assert np.allclose(sitk.GetArrayViewFromImage(mine.heatmaps[scale]),
                               sitk.GetArrayViewFromImage(heatmap), atol=1e-5)  # fmt: skip


def test_several_threads_get_each_their_own_answers_equal_to_predict(model, cts) -> None:
    reference = [predict(model, image, points, device="cpu") for image, points in cts]
    batcher = NoduleBatcher(model, device="cpu")
    answers: dict[int, list] = {}
    start = threading.Barrier(len(cts), timeout=60)

    def work(n: int) -> None:
        image, points = cts[n]
        start.wait()
        answers[n] = list(batcher.iter_predict(image, points))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(cts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    batcher.close()

    for n in range(len(cts)):
        same(answers[n], reference[n])


def test_crops_handed_in_while_the_network_runs_share_the_next_forward_pass(model, cts) -> None:
    image, points = cts[3]
    busy = crop_batch(image, points * 8, model)  # 32 nodules with heatmaps: the network thread is busy a while
    crops = [crop_batch(img, pts, model) for img, pts in cts]  # cut before: handing in takes microseconds
    batcher = NoduleBatcher(model, device="cpu")
    first = batcher.submit(busy, points * 8)  # more than a pass holds: it runs alone
    waiting = [batcher.submit(cut, pts) for cut, (_, pts) in zip(crops, cts, strict=True)]
    answers = [future.result(timeout=WAIT_S) for future in waiting]
    first.result(timeout=WAIT_S)
    batcher.close()

    assert batcher.passes == 2  # the four CTs in one pass after the first
    assert batcher.largest_pass == 4
    for (img, pts), answer in zip(cts, answers, strict=True):
        same(answer, predict(model, img, pts, device="cpu"))


def test_a_ct_whose_forward_pass_fails_fails_alone(model, cts) -> None:
    image, points = cts[3]
    busy = crop_batch(image, points * 8, model)
    broken = crop_batch(image, points[:1], model)
    for crops in broken.values():
        crops[:] = np.nan  # the network answers NaN for it: a non-finite output
    fine = crop_batch(*cts[1], model)
    batcher = NoduleBatcher(model, device="cpu")
    first = batcher.submit(busy, points * 8)
    bad = batcher.submit(broken, points[:1])
    good = batcher.submit(fine, cts[1][1])
    first.result(timeout=WAIT_S)
    with pytest.raises(M3NetInputError, match="non-finite"):
        bad.result(timeout=WAIT_S)
    same(good.result(timeout=WAIT_S), predict(model, *cts[1], device="cpu"))
    batcher.close()
    assert batcher.failed_shared_passes == 1  # the two shared a pass that failed; each then ran alone


def test_the_checks_of_predict_come_before_any_work(model, cts) -> None:
    image, _ = cts[0]
    batcher = NoduleBatcher(model, device="cpu")
    with pytest.raises(M3NetInputError, match="outside"):
        batcher.iter_predict(image, [(500.0, 0.0, 0.0)])
    assert batcher.passes == 0
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(crop_batch(image, cts[0][1], model), cts[0][1])


def test_a_network_thread_that_dies_answers_every_waiting_request(model, cts) -> None:
    image, points = cts[0]
    crops = crop_batch(image, points, model)
    batcher = NoduleBatcher(model, device="cpu")
    batcher._answer = None  # the thread's next step fails outside the network: the thread stops
    waiting = [batcher.submit(crops, points) for _ in range(3)]
    for future in waiting:
        with pytest.raises(RuntimeError, match="network thread stopped"):
            future.result(timeout=WAIT_S)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(crops, points)
    assert isinstance(batcher.stopped_by, TypeError)
