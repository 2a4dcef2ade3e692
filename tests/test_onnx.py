"""models/exchange/onnx.py: ONNX export, checked with onnxruntime against the torch model."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from models import get_maest
from models.exchange.hf import export_hf
from models.exchange.onnx import export_onnx
from models.inference import split_into_clips, track_probabilities
from models.mel import MelSpectrogram, normalize


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
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out[0]) if len(out) == 1 else tuple(map(torch.from_numpy, out))


def test_mel_input_logits_match_for_any_batch_and_length(model, tmp_path):
    path = export_onnx(model, tmp_path / "maest.onnx")
    assert path == tmp_path / "maest.onnx" and path.is_file()
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".*.tmp"))  # one self-contained file
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape[1], out.name, out.shape[1:]) == ("mel", 96, "logits", [5])
    assert isinstance(inp.shape[0], str) and isinstance(inp.shape[2], str)  # dynamic batch and time axes
    meta = sess.get_modelmeta().custom_metadata_map
    assert (meta["min_frames"], meta["max_frames"]) == ("16", "115")  # past 115 onnxruntime's own error is a broadcast
    # One patch (16 frames) up to the longest input with a time position per patch (max_frames 106 + 9).
    for batch, frames in ((1, 106), (3, 106), (2, 16), (1, 53), (2, 100), (1, 115)):
        mel = torch.randn(batch, 96, frames)
        expected = model(mel)
        assert expected.abs().max() > 0.5
        torch.testing.assert_close(run(sess, mel), expected.detach(), atol=1e-4, rtol=0)
    assert model.config.check_finite and not model.training  # the caller's model is untouched


def test_audio_input_runs_the_mel_front_end_and_the_clips_inside(model, tmp_path):
    # Clips of 60 frames with a half hop, as predict.hop=half: the graph cuts, pads and averages as we do.
    sess = session(export_onnx(model, tmp_path / "audio.onnx", with_mel=True, clip_frames=60, hop_frames=30))
    (inp,) = sess.get_inputs()
    assert inp.name == "audio" and all(isinstance(d, str) for d in inp.shape)  # any batch, any length
    assert [o.name for o in sess.get_outputs()] == ["logits", "probabilities"]
    # the clips axis is named, not the exporter's formula of the number of samples
    assert [o.shape for o in sess.get_outputs()] == [[inp.shape[0], "clips", 5], [inp.shape[0], 5]]
    mel = MelSpectrogram()
    for batch, samples in ((1, 59 * 256), (3, 59 * 256), (2, 3000), (1, 200 * 256 + 77)):
        audio = torch.randn(batch, samples) * 0.1
        logits, probabilities = run(sess, audio)
        clips = [normalize(split_into_clips(mel(a), 60, 30)) for a in audio]  # the clips extraction cuts
        assert logits.shape == (batch, len(clips[0]), 5)
        torch.testing.assert_close(logits, torch.stack([model(c) for c in clips]).detach(), atol=1e-4, rtol=0)
        expected = torch.stack(track_probabilities(model, list(audio), 60, 30))  # what predict reports
        torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)


def opset(path) -> int:
    return {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]


def test_embeddings_of_a_block(model, tmp_path):
    path = export_onnx(model, tmp_path / "emb.onnx", block=0)
    assert opset(path) == 18
    sess = session(path)
    (out,) = sess.get_outputs()
    assert (out.name, out.shape[1:]) == ("embeddings", [3, 64])
    for batch, frames in ((1, 106), (3, 70)):
        mel = torch.randn(batch, 96, frames)
        torch.testing.assert_close(run(sess, mel), model.embeddings(mel, block=0).detach(), atol=1e-4, rtol=0)


def test_a_lower_opset_is_honoured_where_onnx_can_convert(model, tmp_path):
    path = export_onnx(model, tmp_path / "o17.onnx", opset=17)
    assert opset(path) == 17
    mel = torch.randn(2, 96, 106)
    torch.testing.assert_close(run(session(path), mel), model(mel).detach(), atol=1e-4, rtol=0)


def test_invalid_requests_fail_before_or_instead_of_writing(model, tmp_path):
    with pytest.raises(ValueError, match=r"clip_frames must be in \[16, 115\]"):
        export_onnx(model, tmp_path / "x.onnx", with_mel=True, clip_frames=200)
    with pytest.raises(ValueError, match=r"hop_frames must be in \[1, clip_frames=100\]"):
        export_onnx(model, tmp_path / "x.onnx", with_mel=True, hop_frames=101)
    with pytest.raises(ValueError, match=r"clip_frames and hop_frames set the clips of the audio graph"):
        export_onnx(model, tmp_path / "x.onnx", clip_frames=50)
    with pytest.raises(ValueError, match=r"block must be an integer in \[0, 1\]"):
        export_onnx(model, tmp_path / "x.onnx", block=2)
    # onnx cannot lower the front-end's Pad to opset 17: an error, not a file of another opset.
    with pytest.raises(ValueError, match=r"opset 17 \(it stays at 18\); use opset=18 or with_mel=False"):
        export_onnx(model, tmp_path / "x.onnx", with_mel=True, clip_frames=30, opset=17)
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.onnx.part").exists() and not list(tmp_path.glob(".*.tmp"))


def test_exchange_formats_live_in_one_package_and_depend_one_way():
    """ONNX and Hugging Face sit in models/exchange/; models.checkpoints imports neither (no cycle)."""
    import ast
    import inspect

    import models.checkpoints

    assert (export_onnx.__module__, export_hf.__module__) == ("models.exchange.onnx", "models.exchange.hf")
    tree = ast.parse(inspect.getsource(models.checkpoints))
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("exchange" in name or name in ("hf", "models.hf") for name in imported), imported


def test_an_export_under_info_logging_prints_its_own_line_not_the_exporters_passes(model, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    export_onnx(model, tmp_path / "quiet.onnx")
    names = {r.name for r in caplog.records if r.levelno < logging.WARNING}
    assert not any(name.startswith(("onnx_ir", "onnxscript")) for name in names), names
    assert any(r.name == "models.exchange.onnx" and "exported mel -> logits" in r.getMessage() for r in caplog.records)
    assert logging.getLogger("onnx_ir").level == logging.NOTSET  # restored
