"""helpers/export.py: ONNX export, checked with onnxruntime against the torch model."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from helpers import export as export_module
from helpers.export import export_onnx
from models import get_maest
from models.hf import export_hf
from models.mel import MelSpectrogram


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = get_maest("maest-tiny", n_classes=5, input_t=100)  # max_frames 106
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> torch.Tensor:
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def test_mel_input_logits_match_for_any_batch(model, tmp_path):
    path = export_onnx(model, tmp_path / "maest.onnx")
    assert path == tmp_path / "maest.onnx" and path.is_file()
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.tmp"))  # one self-contained file
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape[1:], out.name, out.shape[1:]) == ("mel", [96, 106], "logits", [5])
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    for batch in (1, 3):
        mel = torch.randn(batch, 96, 106)
        expected = model(mel)
        assert expected.abs().max() > 0.5
        torch.testing.assert_close(run(sess, mel), expected.detach(), atol=1e-4, rtol=0)
    assert model.config.check_finite and not model.training  # the caller's model is untouched


def test_audio_input_runs_the_mel_front_end_inside(model, tmp_path):
    sess = session(export_onnx(model, tmp_path / "audio.onnx", with_mel=True, n_frames=60))
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.shape[1]) == ("audio", 59 * 256)  # (n_frames - 1) * hop samples -> n_frames frames
    mel = MelSpectrogram(normalized=True)
    for batch in (1, 3):
        audio = torch.randn(batch, 59 * 256) * 0.1
        expected = model(mel(audio))
        torch.testing.assert_close(run(sess, audio), expected.detach(), atol=1e-4, rtol=0)


def opset(path) -> int:
    return {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]


def test_embeddings_of_a_block(model, tmp_path):
    path = export_onnx(model, tmp_path / "emb.onnx", block=0)
    assert opset(path) == 18
    sess = session(path)
    (out,) = sess.get_outputs()
    assert (out.name, out.shape[1:]) == ("embeddings", [3, 64])
    for batch in (1, 3):
        mel = torch.randn(batch, 96, 106)
        torch.testing.assert_close(run(sess, mel), model.embeddings(mel, block=0).detach(), atol=1e-4, rtol=0)


def test_a_lower_opset_is_honoured_where_onnx_can_convert(model, tmp_path):
    path = export_onnx(model, tmp_path / "o17.onnx", opset=17)
    assert opset(path) == 17
    mel = torch.randn(2, 96, 106)
    torch.testing.assert_close(run(session(path), mel), model(mel).detach(), atol=1e-4, rtol=0)


def test_invalid_requests_fail_before_or_instead_of_writing(model, tmp_path):
    with pytest.raises(ValueError, match=r"n_frames must be in \[16, 106\]"):
        export_onnx(model, tmp_path / "x.onnx", n_frames=200)
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 1\]"):
        export_onnx(model, tmp_path / "x.onnx", block=2)
    # onnx cannot lower the front-end's Pad to opset 17: an error, not a file of another opset.
    with pytest.raises(ValueError, match=r"opset 17 \(it stays at 18\); use opset=18 or with_mel=False"):
        export_onnx(model, tmp_path / "x.onnx", with_mel=True, n_frames=30, opset=17)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.onnx.part").exists() and not list(tmp_path.glob(".*.tmp"))


def test_export_module_also_offers_the_hugging_face_export():
    assert export_module.export_hf is export_hf
