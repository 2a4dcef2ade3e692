"""Loading a checkpoint never runs code from it (SPEC §5.1): malicious files through the Python API
and through every ex_maest command that loads a model; full unpickling only with trust_checkpoint."""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import pickle
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from models import MAEST, MAESTConfig, get_maest
from models.checkpoints import CheckpointError, read_checkpoint

PROJECT = Path(__file__).resolve().parent.parent
INPUT_T = 125  # 2 s clips
TINY = dict(embed_dim=64, depth=2, num_heads=4, input_t=INPUT_T)


# ------------------------------------------------------------------------------ payloads
# Each one creates the file `marker` when unpickled by a full unpickler (checked below).
class OsSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Exec(OsSystem):
    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class Eval(OsSystem):
    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


class Open(OsSystem):
    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class SubprocessCall(OsSystem):
    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


class _Import:
    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return (builtins.__import__, (self.name,))


class _Getattr:
    """getattr(obj, name) at unpickling time; callable so that it can stand as a REDUCE function."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __call__(self, *args):
        raise AssertionError("never called at pickling time")

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


class GetattrSystem(OsSystem):
    def __reduce__(self):  # getattr(__import__("os"), "system")("touch marker")
        return (_Getattr(_Import("os"), "system"), (f"touch '{self.marker}'",))


class NestedPickle(OsSystem):
    def __reduce__(self):
        return (pickle.loads, (pickle.dumps(OsSystem(self.marker)),))


class Partial(OsSystem):
    def __reduce__(self):  # a functools.partial built with BUILD/__setstate__, then called
        return (functools.partial(os.system, f"touch '{self.marker}'"), ())


def numpy_object_array(marker):
    array = np.empty(1, dtype=object)
    array[0] = Exec(marker)
    return array


PAYLOADS = [OsSystem, Exec, Eval, Open, SubprocessCall, GetattrSystem, NestedPickle, Partial, numpy_object_array]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_every_payload_is_live_under_a_full_unpickler(payload, tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()


class _HookedParameter:
    """A parameter pickled with backward hooks (torch never writes them; an attacker can)."""

    def __init__(self, tensor, hook):
        self.tensor, self.hook = tensor, hook

    def __reduce__(self):
        return (torch._utils._rebuild_parameter, (self.tensor, False, OrderedDict({0: self.hook})))


class _HookedTensor(_HookedParameter):
    def __reduce__(self):
        t = self.tensor
        storage = torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)  # pickled as FloatStorage
        return (torch._utils._rebuild_tensor_v2, (storage, 0, tuple(t.shape), t.stride(), False, OrderedDict({0: self.hook})))


def tiny(seed=0, n_classes=10):
    torch.manual_seed(seed)
    return MAEST(MAESTConfig(**TINY, n_classes=n_classes)).eval()


def malicious_checkpoint(path, marker, net, swa, **extra):
    """A Lightning checkpoint whose weights are good and whose every other part runs code (``extra``: more top-level entries)."""
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    sd.update({f"net_swa.{k}": v for k, v in swa.state_dict().items()})
    # Tensors whose rebuild carries code: backward hooks (_rebuild_parameter, _rebuild_tensor_v2)
    # and attribute state (_rebuild_parameter_with_state).
    sd["net_swa.cls_token"] = _HookedParameter(swa.cls_token.detach().clone(), OsSystem(marker))
    sd["net_swa.dist_token"] = _HookedTensor(swa.dist_token.detach().clone(), Exec(marker))
    param = torch.nn.Parameter(swa.new_pos_embed.detach().clone())
    param.evil = GetattrSystem(marker)
    sd["net_swa.new_pos_embed"] = param
    torch.save(
        {
            "state_dict": sd,
            "epoch": 3,
            "hyper_parameters": {p.__name__: p(marker) for p in PAYLOADS},
            "callbacks": Partial(marker),  # at the top level too
            **extra,
        },
        path,
    )
    return path


@pytest.fixture
def nets():
    return tiny(0), tiny(1)


@pytest.fixture
def evil(tmp_path, nets):
    marker = tmp_path / "pwned"
    path = malicious_checkpoint(tmp_path / "evil.ckpt", marker, *nets)
    return path, marker


# ------------------------------------------------------------------------------ Python API
def test_malicious_checkpoint_loads_its_weights_and_runs_nothing(evil, nets, caplog, monkeypatch):
    path, marker = evil
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an environment asking torch for full loads changes nothing
    with caplog.at_level(logging.WARNING, logger="models.checkpoints"):
        swa = get_maest("maest-tiny", checkpoint=path, **TINY, n_classes=10)
        plain = get_maest("maest-tiny", checkpoint=path, checkpoint_swa_weights=False, **TINY, n_classes=10)
    assert not marker.exists()
    for loaded, expected in ((swa, nets[1]), (plain, nets[0])):
        for key, value in expected.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert "not unpickled" in caplog.text and "posix.system" in caplog.text and "trust_checkpoint=True" in caplog.text


def test_what_the_restricted_reader_keeps_is_inert_data(evil):
    from models.safe_unpickle import Inert, safe_load

    path, marker = evil
    obj, inert = safe_load(path)
    assert not marker.exists()
    assert {"posix.system", "builtins.exec", "builtins.eval", "io.open", "subprocess.call", "builtins.getattr",
            "builtins.__import__", "pickle.loads", "functools.partial"} <= {n.replace("_pickle.", "pickle.") for n in inert}
    hp = obj["hyper_parameters"]
    assert isinstance(hp["OsSystem"], Inert) and (hp["OsSystem"].module, hp["OsSystem"].name) == ("posix", "system")
    assert hp["OsSystem"].args == (f"touch '{marker}'",)  # what it would have run, as data
    assert all(isinstance(v, Inert) for v in hp.values())
    assert obj["epoch"] == 3 and isinstance(obj["state_dict"]["net.cls_token"], torch.Tensor)


def test_the_object_at_the_top_of_the_file_is_not_built(tmp_path):
    marker = tmp_path / "pwned"
    for i, payload in enumerate(PAYLOADS):
        path = tmp_path / f"top{i}.ckpt"
        torch.save(payload(marker), path)
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*trust_checkpoint=True"):
            get_maest("maest-tiny", checkpoint=path, **TINY, n_classes=10)
        assert not marker.exists(), payload.__name__


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_a_hand_written_pickle_cannot_call_through_the_allowed_builders(tmp_path):
    """Raw opcodes: REDUCE on what an allowed builder returned, BUILD on a tensor, SETITEMS on a tensor."""
    marker = tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    import zipfile

    with zipfile.ZipFile(good) as z:
        names = z.namelist()
        entries = {n: z.read(n) for n in names}
    prefix = next(n for n in names if n.endswith("data.pkl"))
    cmd = f"touch '{marker}'".encode()
    attacks = [
        # dict(...) then call the dict; getattr on it
        b"\x80\x02c__builtin__\ndict\n)R(S'" + cmd + b"'\ntR.",
        # os.system via the protocol-0 INST opcode
        b"(S'" + cmd + b"'\nios\nsystem\n.",
        # os.system by STACK_GLOBAL (protocol 4), called with REDUCE
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.",
    ]
    for i, data in enumerate(attacks):
        path = tmp_path / f"raw{i}.pt"
        with zipfile.ZipFile(path, "w") as z:
            for name, content in entries.items():
                z.writestr(name, data if name == prefix else content)
        with pytest.raises(CheckpointError):
            get_maest("maest-tiny", checkpoint=path, **TINY, n_classes=10)
        assert not marker.exists(), i


def test_weights_that_need_objects_name_the_trust_option(tmp_path, nets):
    net, swa = nets
    sd = TrustedStateDict({f"net.{k}": v for k, v in net.state_dict().items()})
    sd.update({f"net_swa.{k}": v for k, v in swa.state_dict().items()})
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*TrustedStateDict.*trust_checkpoint=True \(config: maest.trust_checkpoint=True\)"):
        get_maest("maest-tiny", checkpoint=path, **TINY, n_classes=10)
    loaded = get_maest("maest-tiny", checkpoint=path, trust_checkpoint=True, **TINY, n_classes=10)  # a file we trust
    for key, value in swa.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class TrustedStateDict(dict):
    """A benign custom class (importable from this module) that only a full unpickler rebuilds."""


def test_trust_checkpoint_really_unpickles_fully(evil):
    path, marker = evil
    read_checkpoint(path, trust_checkpoint=True)
    assert marker.exists()  # what the option means: only for files you trust


def test_pretrained_weights_are_read_safely_too(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    torch.manual_seed(3)
    sd = MAEST(MAESTConfig(embed_dim=64, depth=2, num_heads=4, n_classes=527, input_t=998, input_f=128)).state_dict()
    torch.save({"model": sd, "args": OsSystem(marker)}, tmp_path / "passt-s-f128-p16-s10-ap.476-swa.pt")
    model = get_maest("passt_s_swa_p16_128_ap476", pretrained=True, weights_directory=tmp_path, embed_dim=64, depth=2, num_heads=4, input_t=625)
    assert not marker.exists()
    assert torch.equal(model.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_no_full_unpickling_outside_the_trusted_option():
    """The before-stop hook's check: every `weights_only=False` in library code is on a trust_checkpoint line."""
    offenders = []
    for path in [*sorted((PROJECT / "models").rglob("*.py")), *sorted((PROJECT / "helpers").rglob("*.py")), PROJECT / "ex_maest.py", PROJECT / "ex_tl.py"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "weights_only=False" in line and "trust" not in line:
                offenders.append(f"{path.relative_to(PROJECT)}:{n}")
            if re.search(r"\bpickle\.loads?\(|torch\.load\(", line) and "weights_only=True" not in line and "trust" not in line:
                if path.name not in ("melfiles.py",):  # ground-truth pickles are not checkpoints
                    offenders.append(f"{path.relative_to(PROJECT)}:{n}")
    assert offenders == []


# ------------------------------------------------------------------------------ every command
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=30, clip_length=2.0)


@pytest.fixture(scope="module")
def evil_command_checkpoint(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    marker = root / "pwned"
    net, swa = tiny(0, data["n_classes"]), tiny(1, data["n_classes"])
    return malicious_checkpoint(root / "evil.ckpt", marker, net, swa), marker, swa


def command_updates(data, checkpoint, out):
    audio = out / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    sf.write(audio / "a.wav", np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32), 16000)
    return {
        "seed": 0,
        "synthetic_data": {"out_dir": None},
        "inference_checkpoint": None,
        "maest": {"arch": "maest-tiny", "checkpoint": str(checkpoint), "n_classes": data["n_classes"], "input_t": INPUT_T},
        "datamodule": {
            "base_dir": data["base_dir"], "groundtruth_train": data["groundtruth_train"], "groundtruth_val": data["groundtruth_val"],
            "groundtruth_test": data["groundtruth_test"], "groundtruth_predict": data["groundtruth_test"], "clip_length": 2,
            "epoch_length": 8, "batch_size_train": 4, "batch_size_test": 8, "num_workers": 0,
        },
        "module": {"swa_epoch_start": 0, "swa_freq": 1},
        "trainer": {"max_epochs": 1, "default_root_dir": str(out / "train"), "accelerator": "cpu", "precision": "32-true",
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False, "limit_val_batches": 1},
        "predict": {"out_dir": str(out / "emb"), "transformer_block": 1, "num_workers": 0, "device": "cpu",
                    "audio": [str(audio)], "output": str(out / "p.json")},
        "export": {"out_dir": str(out / "export")},
        "speed_test_iterations": 1,
        "speed_test_batch_size": 1,
    }


COMMANDS = ["test", "extract_embeddings", "extract_logits", "predict", "export_onnx", "export_hf", "model_speed_test", "main"]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_runs_code_from_a_checkpoint(command, data, evil_command_checkpoint, tmp_path):
    from ex_maest import ex

    path, marker, swa = evil_command_checkpoint
    updates = command_updates(data, path, tmp_path)
    named = ["demo"] if command == "main" else []
    run = ex.run(command, named_configs=named, config_updates=updates, options={"--loglevel": "ERROR"})
    assert run.status == "COMPLETED"
    assert not marker.exists()
    if command == "export_onnx":
        assert (tmp_path / "export" / "model.onnx").is_file()
    if command == "export_hf":
        assert (tmp_path / "export" / "config.json").is_file()
    if command == "predict":
        assert [r["file"] for r in json.loads((tmp_path / "p.json").read_text())] == [str(tmp_path / "audio" / "a.wav")]


def test_the_test_command_uses_the_good_weights_of_a_malicious_file(data, evil_command_checkpoint, tmp_path):
    from ex_maest import ex

    path, marker, swa = evil_command_checkpoint
    clean = tmp_path / "clean.pt"
    torch.save(swa.state_dict(), clean)
    results = [
        ex.run("test", config_updates=command_updates(data, p, tmp_path / p.stem), options={"--loglevel": "ERROR"}).result
        for p in (path, clean)
    ]
    assert results[0]["test_loss"] == results[1]["test_loss"]
    assert not marker.exists()


def test_the_trust_option_is_a_config_key(data, tmp_path):
    from ex_maest import ex

    net = tiny(0, data["n_classes"])
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": TrustedStateDict({f"net_swa.{k}": v for k, v in net.state_dict().items()})}, path)
    updates = command_updates(data, path, tmp_path)
    with pytest.raises(CheckpointError, match="maest.trust_checkpoint=True"):
        ex.run("model_speed_test", config_updates=updates, options={"--loglevel": "ERROR"})
    updates["maest"]["trust_checkpoint"] = True
    assert ex.run("model_speed_test", config_updates=updates, options={"--loglevel": "ERROR"}).status == "COMPLETED"


def test_resuming_from_a_malicious_checkpoint_runs_nothing(data, evil_command_checkpoint, tmp_path, monkeypatch):
    """ckpt_path is read by Lightning weights-only, even where the environment asks torch for full loads."""
    from ex_maest import ex

    path, marker, _ = evil_command_checkpoint
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    updates = command_updates(data, path, tmp_path)
    updates["maest"]["checkpoint"] = None
    updates["ckpt_path"] = str(path)
    # Not a Lightning checkpoint: the command's own check (a safe read) refuses it.
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        ex.run("main", named_configs=["demo"], config_updates=updates, options={"--loglevel": "ERROR"})
    assert not marker.exists()
    # One that passes the check (Lightning's version key, this network's weights): Lightning reads it weights-only.
    net, swa = tiny(0, data["n_classes"]), tiny(1, data["n_classes"])
    lightning_like = malicious_checkpoint(tmp_path / "evil-lightning.ckpt", marker, net, swa, **{"pytorch-lightning_version": "2.5.0"})
    updates["ckpt_path"] = str(lightning_like)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ex.run("main", named_configs=["demo"], config_updates=updates, options={"--loglevel": "ERROR"})
    assert not marker.exists()
