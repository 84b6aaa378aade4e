"""``m3net export --format onnx``: onnxruntime reproduces predict's logit and scale attention on the same crops."""

from __future__ import annotations

import numpy as np
import pytest

from m3netcore.checkpoint import file_sha256, load_model
from m3netcore.cli import main
from m3netcore.crops import extract_crops
from m3netcore.predict import predict

onnx = pytest.importorskip("onnx")  # the [onnx] extra, in [dev]
onnxruntime = pytest.importorskip("onnxruntime")


def test_onnxruntime_gives_the_logit_and_scale_attention_of_predict(untrained_model_file, small_ct, phantom,
                                                                     tmp_path, capsys):  # fmt: skip
    out = tmp_path / "model.onnx"
    assert main(["export", str(untrained_model_file), "--format", "onnx", "--out", str(out)]) == 0
    printed, told = capsys.readouterr()
    assert "Converting a tensor" not in told  # the tracer's note about a constant is not the user's concern
    assert f"sha256   {file_sha256(out)}" in printed and f"wrote {out}" in printed
    model = load_model(untrained_model_file)
    centre = np.asarray(phantom.NODULE_LPS)
    points = [centre, centre + [6.0, -4.0, 3.0]]  # two nodules in one batch: the batch axis is dynamic
    results = predict(model, small_ct, points, explain=False, device="cpu")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["micro", "meso", "macro"]
    per_point = [extract_crops(small_ct, point, model.preprocessing) for point in points]
    feeds = {name: np.stack([crops[name] for crops in per_point])[:, None].astype(np.float32)
             for name in model.preprocessing.scale_names}  # fmt: skip
    logit, attention = session.run(["logit", "scale_attention"], feeds)
    assert logit.shape == (2,) and attention.shape == (2, 3)
    expected_logit = [r.logit for r in results]
    expected_attention = [[r.scale_attention[name] for name in ("micro", "meso", "macro")] for r in results]
    assert np.abs(logit - expected_logit).max() < 1e-5  # measured about 2e-7
    assert np.abs(attention - expected_attention).max() < 1e-5
    assert abs(expected_logit[0] - expected_logit[1]) > 1e-4  # two different nodules: the comparison can fail
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert float(metadata["temperature"]) == model.temperature and metadata["m3net_architecture"] == "m3net"


def test_export_refuses_a_folder_and_an_unknown_model(tmp_path, capsys):
    assert main(["export", "no-such-model", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no model file 'no-such-model'" in capsys.readouterr().err
    assert main(["export", "demo", "--format", "onnx", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
