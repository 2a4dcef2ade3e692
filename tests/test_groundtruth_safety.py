"""Ground-truth pickles and .npy files never run code (issue 8): every reader of a ground truth goes
through ``load_groundtruth``, which rebuilds only label data and refuses any other pickled object."""

from __future__ import annotations

import base64
import builtins
import collections
import os
import pickle
import re

import numpy as np
import pytest

from helpers.data import teacher_targets
from helpers.melfiles import GroundTruthError, MelFileError, MelReader, load_groundtruth, save_groundtruth, write_mel


class _Call:
    """Pickles as ``func(*args)``: what an attacker's ``__reduce__`` does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker) -> dict[str, bytes]:
    """Ground-truth pickles that create ``marker`` when fully unpickled."""
    touch = f"open({str(marker)!r}, 'w').close()"
    evil_system = _Call(os.system, f"touch '{marker}'")
    getattr_chain = (  # getattr(__import__('os'), 'system')('touch marker'), nested in a dict value
        b"(dp0\nVa.mmap\np1\n(lp2\nF0.0\naccopy_reg\n_reconstructor\np3\n0cbuiltins\ngetattr\n(cbuiltins\n__import__\n"
        b"(S'os'\ntRS'system'\ntR(S'touch " + str(marker).encode() + b"'\ntRas."
    )
    return {
        "os.system via __reduce__": pickle.dumps({"a.mmap": evil_system}),
        "builtins.exec": pickle.dumps({"a.mmap": np.zeros(3), "b.mmap": _Call(builtins.exec, touch)}, protocol=2),
        "builtins.open": pickle.dumps({"a.mmap": _Call(builtins.open, str(marker), "w")}, protocol=5),
        "getattr chain": getattr_chain,
        "object-dtype numpy array": pickle.dumps({"a.mmap": np.array([evil_system, 1.0], dtype=object)}),
        "nested in lists, tuples and an OrderedDict": pickle.dumps(
            collections.OrderedDict([("a.mmap", [0.0, (1.0, {"x": [evil_system]})])]), protocol=4
        ),
        "numpy's runstring": (  # numpy.testing._private.utils.runstring(code, {}) executes code
            b"cnumpy.testing._private.utils\nrunstring\n(V" + touch.encode() + b"\n(dtR."
        ),
        "the top-level object": pickle.dumps(evil_system, protocol=0),
    }


PAYLOAD_NAMES = list(_payloads("m"))


def _error_of(func, *args, **kwargs) -> Exception | None:
    """The exception ``func`` raises (None if none): the marker is checked before the error."""
    try:
        func(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _assert_refused_os_system(error, gt):
    assert isinstance(error, GroundTruthError), repr(error)
    assert re.search(rf"{gt} holds the global (posix|os)\.system", str(error)), str(error)


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_malicious_ground_truths_are_refused_without_running_code(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "gt.pk"
    path.write_bytes(_payloads(marker)[name])
    error = _error_of(load_groundtruth, path)
    assert not marker.exists(), "loading the ground truth ran code from it"
    assert isinstance(error, GroundTruthError) and re.search(rf"ground-truth file {path} .*a ground truth holds a dict", str(error))
    # Which global was refused is named (posix.system is os.system as pickled on Linux).
    expected = {
        "os.system via __reduce__": r"global (posix|os)\.system",
        "builtins.exec": r"global builtins\.exec",
        "builtins.open": r"global (builtins|io)\.open",
        "getattr chain": r"global copyreg\._reconstructor",
        "object-dtype numpy array": r"dtype 'O8'",
        "nested in lists, tuples and an OrderedDict": r"global (posix|os)\.system",
        "numpy's runstring": r"global numpy\.testing\._private\.utils\.runstring",
        "the top-level object": r"global (posix|os)\.system",
    }[name]
    assert re.search(expected, str(error)), str(error)


def test_a_dtype_state_that_claims_object_items_is_refused(tmp_path):
    """numpy's own dtype.__setstate__ accepts any flags: a float dtype flagged as holding objects
    makes numpy treat the array's bytes as object pointers. Only plain dtype states are accepted."""
    data = pickle.dumps({"a.mmap": np.array([1.0, 2.0])}, protocol=0)
    bad = data.replace(b"I-1\nI-1\nI0\nt", b"I-1\nI-1\nI63\nt")
    assert bad != data
    (tmp_path / "gt.pk").write_bytes(bad)
    with pytest.raises(GroundTruthError, match=r"numpy dtype with the state \(3, '<', None, None, None, -1, -1, 63\)"):
        load_groundtruth(tmp_path / "gt.pk")


def test_numpy_ndarray_is_never_called_and_reconstruct_builds_only_ndarrays(tmp_path):
    called = tmp_path / "a.pk"  # numpy.ndarray((3,), 'O') called directly
    called.write_bytes(b"(dVa.mmap\ncnumpy\nndarray\n((I3\ntVO\ntRs.")
    with pytest.raises(GroundTruthError, match="cannot be read as a ground-truth pickle"):
        load_groundtruth(called)
    other = tmp_path / "b.pk"  # _reconstruct of another type
    other.write_bytes(b"(dVa.mmap\ncnumpy._core.multiarray\n_reconstruct\n(cnumpy\nmemmap\n(I0\ntS'b'\ntRs.")
    with pytest.raises(GroundTruthError, match=r"global numpy\.memmap"):
        load_groundtruth(other)


def test_other_content_is_refused_with_what_a_ground_truth_holds(tmp_path):
    for value, words in (
        ([{"a.mmap": 1}], " holds list, not a dict"),
        ({}, r" holds no tracks \(an empty dict\)"),
        ({"a.mmap": ["rock", "jazz"]}, r": label vectors of dtype kind\(s\) \['U'\]"),
        ({"a.mmap": [1.0, [0.0, 1.0]]}, ": a label vector is not an array"),
    ):
        path = save_groundtruth(tmp_path / "gt.pk", value)
        with pytest.raises(GroundTruthError, match=rf"ground-truth file {path}{words}.*a ground truth holds a dict"):
            load_groundtruth(path)


GOOD = {"a/one.mmap": np.array([True, False, True]), "b/two.mmap": np.array([False, False, True])}


def _assert_same(loaded, original):
    assert type(loaded) is type(original) and list(loaded) == list(original)
    for key, value in original.items():
        assert type(loaded[key]) is type(value)
        if isinstance(value, np.ndarray):
            assert loaded[key].dtype.newbyteorder("=") == value.dtype.newbyteorder("=")  # numpy itself swaps to native
            assert np.array_equal(loaded[key], value)
            assert loaded[key].flags.writeable
        else:
            assert loaded[key] == value and [type(v) for v in loaded[key]] == [type(v) for v in value]


def test_a_ground_truth_written_by_save_groundtruth_loads_equal(tmp_path):
    _assert_same(load_groundtruth(save_groundtruth(tmp_path / "gt.pk", GOOD)), GOOD)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "content",
    [
        "bool", "float32", "big-endian float64 and int64", "lists", "numpy scalars", "OrderedDict",
    ],
)
def test_every_protocol_and_label_layout_loads_equal(tmp_path, protocol, content):
    gt = {
        "bool": GOOD,
        "float32": {k: v.astype(np.float32) * 0.5 for k, v in GOOD.items()},
        "big-endian float64 and int64": {"a.mmap": np.array([0.25, 1.0], dtype=">f8"), "b.mmap": np.array([3, -1], dtype=np.int64)},
        "lists": {"a.mmap": [1, 0, 1], "b.mmap": [0.0, 1.0, 0.5], "c.mmap": (True, False, False)},
        "numpy scalars": {"a.mmap": [np.bool_(True), np.bool_(False)], "b.mmap": [np.float32(0.5), np.int64(1)]},
        "OrderedDict": collections.OrderedDict((k, v.astype(np.uint8)) for k, v in GOOD.items()),
    }[content]
    path = tmp_path / "gt.pk"
    path.write_bytes(pickle.dumps(gt, protocol=protocol))
    _assert_same(load_groundtruth(path), gt)


@pytest.mark.parametrize("protocol", [0, 2])
def test_numpy_1_module_paths_load(tmp_path, protocol):
    """numpy 1.x writes numpy.core.multiarray where numpy 2 writes numpy._core.multiarray."""
    data = pickle.dumps({"a.mmap": np.array([1.0, 0.0], dtype=np.float32), "b.mmap": [np.bool_(True), np.bool_(False)]}, protocol=protocol)
    if b"numpy._core" in data:
        data = data.replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"numpy.core.multiarray\nscalar" in data
    (tmp_path / "gt.pk").write_bytes(data)
    gt = load_groundtruth(tmp_path / "gt.pk")
    assert gt["a.mmap"].dtype == np.float32 and gt["a.mmap"].tolist() == [1.0, 0.0]
    assert gt["b.mmap"] == [True, False] and type(gt["b.mmap"][0]) is np.bool_


# {"a.mmap": np.array([True, False]), "b.mmap": np.array([0.5, 1.0], dtype=np.float32),
#  "c.mmap": [np.bool_(True), np.float32(0.5)]} pickled by numpy 1.26.4 (protocols 4 and 5)
NUMPY_1_PICKLES = {
    4: "gASVHQEAAAAAAAB9lCiMBmEubW1hcJSMFW51bXB5LmNvcmUubXVsdGlhcnJheZSMDF9yZWNvbnN0cnVjdJSTlIwFbnVtcHmUjAduZGFycmF5lJOUSwCFlE"
       "MBYpSHlFKUKEsBSwKFlGgFjAVkdHlwZZSTlIwCYjGUiYiHlFKUKEsDjAF8lE5OTkr/////Sv////9LAHSUYolDAgEAlHSUYowGYi5tbWFwlGgEaAdLAIWU"
       "aAmHlFKUKEsBSwKFlGgOjAJmNJSJiIeUUpQoSwOMATyUTk5OSv////9K/////0sAdJRiiUMIAAAAPwAAgD+UdJRijAZjLm1tYXCUXZQoaAKMBnNjYWxhcp"
       "STlGgRQwEBlIaUUpRoJWgdQwQAAAA/lIaUUpRldS4=",
    5: "gAWVGQEAAAAAAAB9lCiMBmEubW1hcJSMEm51bXB5LmNvcmUubnVtZXJpY5SMC19mcm9tYnVmZmVylJOUKJYCAAAAAAAAAAEAlIwFbnVtcHmUjAVkdHlwZZ"
       "STlIwCYjGUiYiHlFKUKEsDjAF8lE5OTkr/////Sv////9LAHSUYksChZSMAUOUdJRSlIwGYi5tbWFwlGgEKJYIAAAAAAAAAAAAAD8AAIA/lGgIjAJmNJSJ"
       "iIeUUpQoSwOMATyUTk5OSv////9K/////0sAdJRiSwKFlGgPdJRSlIwGYy5tbWFwlF2UKIwVbnVtcHkuY29yZS5tdWx0aWFycmF5lIwGc2NhbGFylJOUaA"
       "tDAQGUhpRSlGggaBZDBAAAAD+UhpRSlGV1Lg==",
}


@pytest.mark.parametrize("protocol", [4, 5])
def test_ground_truths_pickled_by_numpy_1_load(tmp_path, protocol):
    (tmp_path / "gt.pk").write_bytes(base64.b64decode(NUMPY_1_PICKLES[protocol]))
    gt = load_groundtruth(tmp_path / "gt.pk")
    assert gt["a.mmap"].dtype == bool and gt["a.mmap"].tolist() == [True, False]
    assert gt["b.mmap"].dtype == np.float32 and gt["b.mmap"].tolist() == [0.5, 1.0]
    assert gt["c.mmap"] == [True, 0.5] and [type(v) for v in gt["c.mmap"]] == [np.bool_, np.float32]


def test_a_pickled_npy_mel_or_teacher_file_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = np.array([_Call(os.system, f"touch '{marker}'")], dtype=object)
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    write_mel(tmp_path / "good.npy", np.zeros((20, 96), dtype=np.float32))
    with pytest.raises(MelFileError, match="evil.npy cannot be read as .npy"):
        MelReader(tmp_path).open("evil.npy")
    np.save(tmp_path / "t.logits.npy", evil, allow_pickle=True)
    with pytest.raises(ValueError, match=r"t\.logits\.npy cannot be read as \.npy"):
        teacher_targets(tmp_path, "t")
    assert not marker.exists()


def _command_setup(tmp_path, marker):
    base = tmp_path / "mels"
    write_mel(base / "a.mmap", np.ones((40, 96), dtype=np.float32))
    gt = tmp_path / "gt.pk"
    gt.write_bytes(pickle.dumps({"a.mmap": np.array([True, False]), "b.mmap": _Call(os.system, f"touch '{marker}'")}))
    return base, gt


def test_commands_never_run_code_from_a_ground_truth(tmp_path):
    from ex_maest import ex

    marker = tmp_path / "pwned"
    base, gt = _command_setup(tmp_path, marker)
    updates = {"datamodule": {"base_dir": str(base), "groundtruth_train": str(gt)}, "norm_stats_out": str(tmp_path / "n.json")}
    error = _error_of(ex.run, "compute_norm_stats", config_updates=updates, options={"--loglevel": "ERROR"})
    assert not marker.exists(), "compute_norm_stats ran code from the ground truth"
    _assert_refused_os_system(error, gt)
    assert not (tmp_path / "n.json").exists()

    updates = {
        "synthetic_data": {"out_dir": None},
        "datamodule": {"base_dir": str(base), "groundtruth_predict": str(gt), "groundtruth_train": None, "groundtruth_val": None,
                       "clip_length": 2, "num_workers": 0},
        "maest": {"arch": "maest-tiny", "pretrained": False, "input_t": 125, "n_classes": 2, "allow_random_weights": True},
        "predict": {"out_dir": str(tmp_path / "out"), "num_workers": 0, "device": "cpu"},
    }
    error = _error_of(ex.run, "extract_embeddings", config_updates=updates, options={"--loglevel": "ERROR"})
    assert not marker.exists(), "extract_embeddings ran code from the ground truth"
    _assert_refused_os_system(error, gt)


def test_linear_probing_never_runs_code_from_a_ground_truth(tmp_path):
    from helpers.probe import EmbeddingDataModule

    marker = tmp_path / "pwned"
    _, gt = _command_setup(tmp_path, marker)
    dm = EmbeddingDataModule(embeddings_dir=tmp_path, groundtruth_train=gt, groundtruth_val=gt, groundtruth_test=gt)
    error = _error_of(dm.setup, "fit")
    assert not marker.exists(), "the probing data module ran code from the ground truth"
    _assert_refused_os_system(error, gt)
