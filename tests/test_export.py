"""Export: ONNX matches PyTorch at any batch size; safetensors round-trips; errors name the fix."""

import json
import sys

import numpy as np
import onnx  # the test extra installs the onnx extra
import onnxruntime
import torch

from dfkt.cli import main
from dfkt.models.files import load_model


def test_onnx_export_matches_pytorch_on_random_inputs(digits_teacher, tmp_path, capsys):
    assert main(["export", digits_teacher, "--out", str(tmp_path / "teacher.onnx")]) == 0
    assert "logits match PyTorch within" in capsys.readouterr().out
    model, info = load_model(digits_teacher)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "teacher.onnx")).metadata_props}
    assert json.loads(meta["dfkt_mean"]) == list(info.mean) and meta["dfkt_num_classes"] == "10"
    session = onnxruntime.InferenceSession(str(tmp_path / "teacher.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # another batch size than the export's example
        x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model.eval()(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert np.allclose(got, expected, atol=1e-4), np.abs(got - expected).max()


def test_safetensors_export_round_trips(digits_teacher, tmp_path):
    assert main(["export", digits_teacher, "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    (a, info_a), (b, info_b) = load_model(digits_teacher), load_model(tmp_path / "m.safetensors")
    assert info_a == info_b
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_onnx_export_without_the_extra_names_the_install(digits_teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it now fails
    assert main(["export", digits_teacher, "--out", str(tmp_path / "t.onnx")]) == 2
    assert "pip install 'dfkt[onnx]'" in capsys.readouterr().err
