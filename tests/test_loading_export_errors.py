"""What loading and exporting say when something does not fit: ONNX export of inference patchout and
its label metadata, the hint for a checkpoint of another arch, the longest input, stale export_hf
staging folders, other checkpoint layouts, SWA weights asked of a bare file, an offline download and
the validator's command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import hear_maest
import hear_maest.validate
from models import MAEST, MAESTConfig, get_maest
from models.checkpoints import CheckpointError, load_state_dict_strict
from models.exchange import hf
from models.exchange.hf import export_hf
from models.registry import DownloadError, download_weights

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=64, depth=2, num_heads=4)  # maest-tiny's shape
LABELS = ["Rock---Punk", "Jazz---Bop", "Electronic---Techno", "Pop---Ballad", "Folk---Celtic"]


def tiny(seed: int = 0, **config) -> MAEST:
    torch.manual_seed(seed)
    return MAEST(MAESTConfig(**{**TINY, "n_classes": 5, "input_t": 100, **config})).eval()


# ---- ONNX: inference patchout and label names ------------------------------------------------------


@pytest.mark.parametrize(
    "patchout, named",
    [(dict(t_interleaved=2), "s_patchout_t_interleaved=2"), (dict(f_indices=(0, 1)), r"s_patchout_f_indices=\(0, 1\)")],
)
def test_onnx_export_of_inference_patchout_is_one_line_saying_how_to_clear_it(tmp_path, patchout, named):
    pytest.importorskip("onnxscript")
    from models.exchange.onnx import export_onnx

    model = get_maest("maest-tiny")
    model.set_inference_patchout(**patchout)
    with pytest.raises(ValueError, match=rf"cannot export inference patchout \({named}\).*model\.set_inference_patchout\(\)") as error:
        export_onnx(model, tmp_path / "x.onnx")
    assert "\n" not in str(error.value) and "maest.s_patchout_" in str(error.value)  # the config key too
    assert not list(tmp_path.iterdir())


def test_onnx_logits_graph_carries_the_label_names_and_an_embeddings_graph_none(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from models.exchange.onnx import export_onnx

    model = tiny()
    model.labels = LABELS
    path = export_onnx(model, tmp_path / "logits.onnx")
    assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["labels"] == json.dumps(LABELS)
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == LABELS
    other = ["a", "b", "c", "d", "e"]  # labels= wins over model.labels
    assert json.loads({p.key: p.value for p in onnx.load(str(export_onnx(model, tmp_path / "o.onnx", labels=other))).metadata_props}["labels"]) == other
    embeddings = export_onnx(model, tmp_path / "emb.onnx", block=0)
    assert "labels" not in {p.key for p in onnx.load(str(embeddings)).metadata_props}
    with pytest.raises(ValueError, match="2 labels given for a model with n_classes=5"):
        export_onnx(model, tmp_path / "x.onnx", labels=["a", "b"])


def test_export_hf_of_inference_patchout_warns_that_every_patch_is_exported(tmp_path, caplog):
    model = tiny()
    model.set_inference_patchout(t_interleaved=2)
    with caplog.at_level(logging.WARNING, logger="models.exchange.hf"):
        out = export_hf(model, tmp_path / "hf", feature_extractor=False)
    assert "inference patchout (s_patchout_t_interleaved=2) is not exported" in caplog.text
    full = tiny()  # the same weights with every patch
    mel = torch.randn(2, 96, 100)
    with torch.no_grad():
        torch.testing.assert_close(get_maest(checkpoint=out)(mel), full(mel), atol=1e-4, rtol=0)


# ---- a checkpoint of another arch ------------------------------------------------------------------


def test_a_checkpoint_of_another_width_names_its_arch_not_an_input_t(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(get_maest("maest-tiny").state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        get_maest("maest-demo", checkpoint=path)
    message = str(error.value)
    assert "its weights are embed_dim=64, depth=2 where maest-demo has embed_dim=192, depth=4" in message
    assert "it is maest-tiny's shape (embed_dim=64, depth=2, num_heads=4): use arch='maest-tiny'" in message
    assert "input_t" not in message and "n_classes" not in message  # maest-tiny's own clip and head fit
    # A 30 s tiny checkpoint with 7 classes: the arch, its clip and its head.
    torch.save(tiny(input_t=1875, n_classes=7).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"use arch='maest-tiny' \(config: maest.arch=maest-tiny\) with n_classes=7, input_t in \[1870, 1879\]"):
        get_maest("maest-demo", checkpoint=path)
    with pytest.raises(CheckpointError, match=r"use arch='maest-tiny'"):  # hear_maest with an arch named
        hear_maest.load_model(str(path), arch="discogs-maest-30s-pw-129e")
    # A shape no registry arch has: the values to set.
    torch.save(tiny(depth=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"no registry arch has that shape: set depth=3 and the num_heads"):
        get_maest("maest-tiny", checkpoint=path)


def test_strict_loading_names_the_other_network_and_keeps_the_input_t_hint_for_time_alone():
    demo = MAEST(MAESTConfig(embed_dim=192, depth=4, num_heads=3))
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(demo, get_maest("maest-tiny").state_dict(), source="checkpoint t.pt")
    message = str(error.value)
    assert "the checkpoint is another network: embed_dim=64, depth=2 (this model: embed_dim=192, depth=4)" in message
    assert "input_t in" not in message
    with pytest.raises(CheckpointError, match=r"38 time positions: build the model with input_t in \[380, 389\]") as error:
        load_state_dict_strict(tiny(input_t=625), tiny(input_t=380).state_dict())
    assert "another network" not in str(error.value)


# ---- the longest input -----------------------------------------------------------------------------


@pytest.mark.parametrize("input_t, longest", [(625, 635), (1875, 1885)])
def test_the_longest_input_the_error_names_is_the_longest_the_model_takes(input_t, longest):
    model = tiny(input_t=input_t)
    assert model.config.max_input_frames == longest
    with torch.no_grad():
        assert model(torch.randn(1, 96, longest)).shape == (1, 5)
        with pytest.raises(ValueError, match=rf"{longest + 1} frames is longer .*\(at most {longest} frames, {input_t // 10} time patches\)"):
            model(torch.randn(1, 96, longest + 1))


# ---- stale export_hf staging folders ---------------------------------------------------------------


def _stage(parent: Path, name: str, age_s: float = 0.0) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half written")
    if age_s:
        then = time.time() - age_s
        for path in (folder / "model.safetensors", folder):
            os.utime(path, (then, then))
    return folder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_a_killed_export_hf_leaves_a_stage_that_the_next_export_removes(tmp_path):
    # A real SIGKILL in the middle of writing: after config.json, before the weights.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from models import MAEST, MAESTConfig
        from models.exchange import hf
        hf._write_weights = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
        hf.export_hf(MAEST(MAESTConfig(embed_dim=64, depth=2, num_heads=4, n_classes=5, input_t=100)), {str(tmp_path / "export")!r}, feature_extractor=False)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    (left,) = tmp_path.glob(".export.*.tmp")
    assert (left / "config.json").is_file() and hf._STAGE_NAME.match(left.name)["pid"].isdigit()
    export_hf(tiny(), tmp_path / "export", feature_extractor=False)
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "export" / "model.safetensors").is_file()


def test_only_stale_staging_folders_are_removed(tmp_path, caplog):
    host, day = hf._host_tag(), hf.STALE_STAGE_AGE_S
    dead, alive = _dead_pid(), os.getpid()  # alive: this process, as another export running now
    removed = [
        _stage(tmp_path, f".export.{host}.{dead}.abcd_123.tmp"),  # its process is gone
        _stage(tmp_path, f".other.v2.{host}.{dead}.zz99aa00.tmp"),  # another export into this parent
        _stage(tmp_path, f".export.elsewhere.{alive}.abcdefgh.tmp", age_s=day + 60),  # another host's, a day old
        _stage(tmp_path, ".export.k2j4h5g6.tmp", age_s=day + 60),  # named by the code before pids were in the name
    ]
    kept = [
        _stage(tmp_path, f".export.{host}.{alive}.abcdefgh.tmp"),  # being written now
        _stage(tmp_path, f".export.elsewhere.{dead}.abcdefgh.tmp"),  # another host's pid says nothing here: too young
        _stage(tmp_path, ".export.k2j4h5g6.tmp".replace("k2", "x9")),  # old-style but recent
        _stage(tmp_path, ".other.k2j4h5g6.tmp", age_s=day + 60),  # old-style of another export name
        _stage(tmp_path, f".notes.{host}.{dead}.abcdefgh.tmpx"),  # not the pattern
        _stage(tmp_path, f".export.{host}.{dead}.abc.tmp"),  # not 8 random characters
    ]
    nested = _stage(tmp_path, f".mine.{host}.{dead}.abcdefgh.tmp")
    (nested / "sub").mkdir()  # export stages hold files only: a folder in it is not ours
    kept.append(nested)
    with caplog.at_level(logging.INFO, logger="models.exchange.hf"):
        export_hf(tiny(), tmp_path / "export", feature_extractor=False)
    assert [p for p in removed if p.exists()] == [] and all(p.is_dir() for p in kept)
    assert f"removed {removed[0]}, the staging folder of an earlier export that did not finish" in caplog.text


# ---- checkpoint layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, swa",
    [
        (lambda sd: {"state_dict": sd}, True),  # loads with get_maest's default, as {"model": sd}
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, True),  # DataParallel / DDP
        (lambda sd: {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}, True),  # torch.compile around DDP
        (lambda sd: {"state_dict": {f"net.module.{k}": v for k, v in sd.items()}}, False),  # Lightning around DDP, no SWA
    ],
    ids=["state_dict", "module", "_orig_mod.module", "net.module"],
)
def test_a_state_dict_loads_in_other_layouts(tmp_path, layout, swa):
    net = tiny()
    path = tmp_path / "wrapped.pt"
    torch.save(layout(net.state_dict()), path)
    loaded = get_maest("maest-tiny", checkpoint=path, checkpoint_swa_weights=swa, n_classes=5, input_t=100)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_a_lightning_checkpoint_of_another_module_still_says_it_has_no_net_keys(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny().state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match=r"Lightning checkpoint without 'net.' keys; found e.g. \['model.cls_token'"):
        get_maest("maest-tiny", checkpoint=path, n_classes=5, input_t=100)


# ---- SWA weights asked of a file without them ------------------------------------------------------


def test_hear_load_model_insisting_on_swa_weights_of_a_bare_file_names_it(tmp_path):
    net = tiny()
    path = tmp_path / "bare.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} has no SWA weights .*a bare state dict.*checkpoint_swa_weights=True insists"):
        hear_maest.load_model(str(path), checkpoint_swa_weights=True, input_t=100)
    for swa in (None, False):
        assert torch.equal(hear_maest.load_model(str(path), checkpoint_swa_weights=swa, input_t=100).maest.cls_token, net.cls_token)


# ---- downloads -------------------------------------------------------------------------------------


def test_a_failed_download_names_the_url_and_the_file_to_place_by_hand(tmp_path, monkeypatch):
    url = (tmp_path / "offline.ckpt").as_uri()  # nothing there: urlopen fails as offline
    target = tmp_path / "w" / "discogs-maest-10s-pw-129e-swa.ckpt"
    with pytest.raises(DownloadError) as error:
        download_weights("discogs-maest-10s-pw-129e", tmp_path / "w", url=url)
    message = str(error.value)
    assert f"from {url} to {target}" in message and f"download {url} elsewhere and save it as {target}" in message
    assert isinstance(error.value, OSError)

    class Broken:  # the connection drops after the first chunk
        def __init__(self):
            self.reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("connection reset by peer")
            return b"x" * 10

    monkeypatch.setattr("urllib.request.urlopen", lambda url: Broken())
    with pytest.raises(DownloadError, match="connection reset by peer"):
        download_weights("discogs-maest-10s-pw-129e", tmp_path / "w", url="https://example.org/w.ckpt")
    assert not target.exists() and not list((tmp_path / "w").glob("*.part"))


# ---- the validator's command line ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["hear_maest", "--model", "m.ckpt", "--device", "cpu"], ["--model", "m.ckpt", "--device", "cpu"], ["-m", "m.ckpt", "-d", "cpu", "hear_maest"]],
)
def test_the_validator_takes_the_module_its_usage_shows(argv, monkeypatch):
    pytest.importorskip("hearvalidator")
    with hear_maest.validate.tensorflow_available():
        import hearvalidator.validate
    seen = []
    monkeypatch.setattr(hearvalidator.validate, "main", lambda: seen.append(list(sys.argv)))
    hear_maest.validate.main(argv)
    assert seen == [["hear-validator", "hear_maest", "--model", "m.ckpt", "--device", "cpu"]]
    assert "[module]" in hear_maest.validate.parser().format_usage()
