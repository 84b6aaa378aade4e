"""m3netcore.predict: CT + points -> probability, label, scale attention and heatmaps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import m3netcore
from m3netcore import M3NetInputError, Model, build_model, default_preprocessing, predict

HEATMAP_GEOMETRY = {  # name -> (field of view in mm, grid) of each heatmap image
    "micro": (24.0, 32),
    "meso": (48.0, 32),
    "macro": (96.0, 32),
    "combined": (96.0, 64),
}
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# A second nodule-free point inside the small CT, 12 mm from the nodule.
OTHER_POINT_OFFSET_MM = (-6.0, 8.0, 7.0)


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("m3net")


@pytest.fixture(scope="module")
def result(network, small_ct, phantom) -> m3netcore.NoduleResult:
    (only,) = predict(network, small_ct, [phantom.NODULE_LPS], device="cpu")
    return only


def other_point(phantom) -> tuple[float, float, float]:
    return tuple(float(c + o) for c, o in zip(phantom.NODULE_LPS, OTHER_POINT_OFFSET_MM, strict=True))


def test_result_has_probability_label_and_attention(result, phantom) -> None:
    assert 0.0 <= result.probability <= 1.0
    assert result.probability == pytest.approx(1.0 / (1.0 + math.exp(-result.logit)), abs=1e-6)
    assert result.label == ("malignant" if result.probability >= 0.5 else "benign")
    assert set(result.scale_attention) == {"micro", "meso", "macro"}
    assert sum(result.scale_attention.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 <= weight <= 1.0 for weight in result.scale_attention.values())
    assert result.point_lps == pytest.approx(phantom.NODULE_LPS)
    assert result.model["device"] == "cpu"


@pytest.mark.parametrize(("threshold", "label"), [(0.0, "malignant"), (1.0, "benign")])
def test_label_follows_the_model_threshold(network, small_ct, phantom, threshold: float, label: str) -> None:
    model = Model(network=network, architecture="m3net", preprocessing=default_preprocessing(), threshold=threshold)
    (answer,) = predict(model, small_ct, [phantom.NODULE_LPS], explain=False, device="cpu")
    assert answer.label == label


def test_probability_uses_the_model_temperature(network, small_ct, phantom, result) -> None:
    model = Model(network=network, architecture="m3net", preprocessing=default_preprocessing(), temperature=4.0)
    (answer,) = predict(model, small_ct, [phantom.NODULE_LPS], explain=False, device="cpu")
    assert answer.logit == pytest.approx(result.logit, abs=1e-5)
    assert answer.probability == pytest.approx(1.0 / (1.0 + math.exp(-result.logit / 4.0)), abs=1e-6)


def test_heatmaps_cover_every_scale_and_the_combination(result) -> None:
    assert set(result.heatmaps) == set(HEATMAP_GEOMETRY)


@pytest.mark.parametrize("name", list(HEATMAP_GEOMETRY))
def test_heatmap_is_a_cube_centred_on_the_point(result, phantom, name: str) -> None:
    heatmap = result.heatmaps[name]
    field_of_view_mm, grid = HEATMAP_GEOMETRY[name]

    assert heatmap.GetSize() == (grid, grid, grid)
    assert heatmap.GetSpacing() == pytest.approx((field_of_view_mm / grid,) * 3, abs=1e-12)
    assert heatmap.GetDirection() == IDENTITY_DIRECTION
    np.testing.assert_allclose(phantom.physical_center(heatmap), phantom.NODULE_LPS, rtol=0, atol=1e-6)
    values = sitk.GetArrayFromImage(heatmap)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert np.isfinite(values).all()


def test_combined_heatmap_peaks_at_one(result) -> None:
    assert sitk.GetArrayFromImage(result.heatmaps["combined"]).max() == pytest.approx(1.0)


def test_ras_points_give_the_same_results_as_lps(network, small_ct, phantom, result) -> None:
    x, y, z = phantom.NODULE_LPS
    (from_ras,) = predict(network, small_ct, [(-x, -y, z)], coords="RAS", device="cpu")

    assert from_ras.point_lps == pytest.approx(result.point_lps, abs=1e-12)
    assert from_ras.probability == pytest.approx(result.probability, abs=1e-7)
    assert from_ras.scale_attention == pytest.approx(result.scale_attention, abs=1e-7)
    assert set(from_ras.heatmaps) == set(result.heatmaps)
    for name, heatmap in result.heatmaps.items():
        assert from_ras.heatmaps[name].GetOrigin() == pytest.approx(heatmap.GetOrigin(), abs=1e-9)
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(from_ras.heatmaps[name]), sitk.GetArrayFromImage(heatmap), atol=1e-6
        )


def test_several_points_in_one_call_match_one_call_per_point(network, small_ct, phantom) -> None:
    points = [phantom.NODULE_LPS, other_point(phantom)]

    together = predict(network, small_ct, points, device="cpu")
    apart = [predict(network, small_ct, [point], device="cpu")[0] for point in points]

    assert len(together) == 2
    assert together[0].probability != pytest.approx(together[1].probability, abs=1e-6)
    for joint, single in zip(together, apart, strict=True):
        assert joint.point_lps == pytest.approx(single.point_lps)
        assert joint.probability == pytest.approx(single.probability, abs=1e-5)
        assert joint.scale_attention == pytest.approx(single.scale_attention, abs=1e-5)
        for name in HEATMAP_GEOMETRY:
            np.testing.assert_allclose(
                sitk.GetArrayFromImage(joint.heatmaps[name]),
                sitk.GetArrayFromImage(single.heatmaps[name]),
                atol=1e-4,
                err_msg=name,
            )


def test_explain_false_gives_no_heatmaps_and_the_same_probability(network, small_ct, phantom, result) -> None:
    (quick,) = predict(network, small_ct, [phantom.NODULE_LPS], explain=False, device="cpu")
    assert quick.heatmaps == {}
    assert quick.probability == pytest.approx(result.probability, abs=1e-6)
    assert quick.scale_attention == pytest.approx(result.scale_attention, abs=1e-6)


def test_single_micro_network_has_all_attention_on_micro(small_ct, phantom) -> None:
    single = build_model("single-micro")

    (answer,) = predict(single, small_ct, [phantom.NODULE_LPS], device="cpu")

    assert 0.0 <= answer.probability <= 1.0
    assert answer.scale_attention == {"micro": 1.0}
    assert set(answer.heatmaps) == {"micro", "combined"}
    combined = answer.heatmaps["combined"]
    assert combined.GetSpacing() == pytest.approx((24.0 / 64,) * 3)  # the largest view is micro
    np.testing.assert_allclose(phantom.physical_center(combined), phantom.NODULE_LPS, atol=1e-6)


def test_result_to_dict_carries_both_coordinate_systems(result, phantom) -> None:
    summary = result.to_dict()
    x, y, z = phantom.NODULE_LPS
    assert summary["point_lps"] == pytest.approx([x, y, z])
    assert summary["point_ras"] == pytest.approx([-x, -y, z])
    assert summary["fields_of_view_mm"]["macro"] == [96.0, 96.0, 96.0]
    assert summary["probability"] == result.probability
    assert summary["prediction"] == result.label


@pytest.mark.parametrize("coords", ["LPS", "RAS"])
def test_point_outside_the_image_is_an_input_error(network, small_ct, phantom, coords: str) -> None:
    inside = phantom.NODULE_LPS
    with pytest.raises(M3NetInputError, match="outside the image"):
        predict(network, small_ct, [inside, (500.0, 0.0, 0.0)], coords=coords, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_cuda_without_a_gpu_is_an_input_error(network, small_ct, phantom) -> None:
    with pytest.raises(M3NetInputError, match="no CUDA GPU"):
        predict(network, small_ct, [phantom.NODULE_LPS], device="cuda")


def test_unknown_device_is_an_input_error(network, small_ct, phantom) -> None:
    with pytest.raises(M3NetInputError, match="device must be"):
        predict(network, small_ct, [phantom.NODULE_LPS], device="tpu")


def test_predict_rejects_what_is_not_a_model(small_ct, phantom) -> None:
    with pytest.raises(TypeError, match="load_model"):
        predict(torch.nn.Linear(2, 2), small_ct, [phantom.NODULE_LPS], device="cpu")


def test_predict_rejects_a_2d_image(network) -> None:
    flat = sitk.Image([64, 64], sitk.sitkInt16)
    with pytest.raises(M3NetInputError, match="2D"):
        predict(network, flat, [(1.0, 1.0, 0.0)], device="cpu")


def test_iter_predict_in_chunks_matches_predict_and_checks_every_point_first(network, small_ct, phantom) -> None:
    from m3netcore.predict import iter_predict

    points = [phantom.NODULE_LPS, other_point(phantom), tuple(np.add(phantom.NODULE_LPS, (3.0, -2.0, 1.0)))]
    together = predict(network, small_ct, points, device="cpu", explain=False)

    chunked = list(iter_predict(network, small_ct, points, device="cpu", explain=False, chunk_size=2))

    assert [r.probability for r in chunked] == pytest.approx([r.probability for r in together], abs=1e-5)
    with pytest.raises(M3NetInputError, match="outside"):  # raised at the call, before any chunk is computed
        iter_predict(network, small_ct, [*points, (500.0, 0.0, 0.0)], device="cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        iter_predict(network, small_ct, points, chunk_size=0)
