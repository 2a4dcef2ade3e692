"""Exact resume: a run killed (SIGKILL) at an epoch boundary or mid-epoch and resumed with
``ckpt_path=last`` ends with the weights and metrics of the run that was never killed.

The kills are real: the run goes in a subprocess that kills itself right after a chosen
checkpoint file is written (a patch of Lightning's ModelCheckpoint in the test's own script).
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ex_maest import ex
from helpers.data import TrainDataset
from helpers.melfiles import MelReader, load_groundtruth
from helpers.resume import get_random_state, set_random_state
from helpers.sampler import BalancedSampler, Draw, RandomEpochSampler
from helpers.synthetic import make_synthetic_dataset
from tests.builders import maest_datamodule

PROJECT = Path(__file__).resolve().parents[1]
EPOCHS = 3
EPOCH_LENGTH = 18  # draws without replacement from 20 training tracks
BATCH_SIZE = 6  # 3 steps an epoch
STEP_CHECKPOINTS = 2  # step checkpoints at steps 2 (epoch 0) and 4 (epoch 1, its first batch)

KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint

    from ex_maest import ex

    updates, kill_file, kill_step = json.loads(Path(sys.argv[1]).read_text())
    save = ModelCheckpoint._save_checkpoint

    def save_then_die(self, trainer, filepath):
        save(self, trainer, filepath)
        if Path(filepath).name.startswith(kill_file) and trainer.global_step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final checkpoint: a real kill

    ModelCheckpoint._save_checkpoint = save_then_die
    ex.run("main", named_configs=["demo"], config_updates=updates, options={"--loglevel": "ERROR"})
    """
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=40, clip_length=2.0)


def demo_updates(data, root) -> dict:
    """The demo, shrunk: a tiny MAEST, 2 s clips, every random draw of training switched on."""
    return {
        "seed": 0,
        "synthetic_data": {"out_dir": None},
        "inference_checkpoint": None,
        "datamodule": {
            "base_dir": data["base_dir"],
            "groundtruth_train": data["groundtruth_train"],
            "groundtruth_val": data["groundtruth_val"],
            "groundtruth_test": data["groundtruth_test"],
            "clip_length": 2,
            "epoch_length": EPOCH_LENGTH,
            "sampler_replacement": False,
            "batch_size_train": BATCH_SIZE,
            "batch_size_test": 16,
            "num_workers": 0,  # workers change nothing (test_crops_depend_on_the_draw_not_on_workers_or_global_rng)
        },
        "maest": {"arch": "maest-tiny", "pretrained": False, "input_t": 125, "s_patchout_t": 3, "s_patchout_f": 1, "drop_path_rate": 0.1},
        "module": {"masking": True, "mixup_alpha": 0.3, "swa_epoch_start": 2, "swa_freq": 1, "warm_up_len": 1, "ramp_down_start": 1, "ramp_down_len": 2},
        "checkpoint_every_n_train_steps": STEP_CHECKPOINTS,
        "trainer": {
            "max_epochs": EPOCHS, "default_root_dir": str(root), "accelerator": "cpu", "precision": "32-true",
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
        },
    }


def _run(updates):
    """Train; the Sacred run record (metrics.json: every epoch's metrics) goes to <trainer.default_root_dir>/record."""
    record = Path(updates["trainer"]["default_root_dir"]) / "record"
    return ex.run("main", named_configs=["demo"], config_updates=updates, options={"--loglevel": "ERROR", "--file_storage": str(record)})


def _epoch_metric(result, name: str) -> dict[int, float]:
    """``{epoch: value}`` of ``name`` in the run's record."""
    record = Path(result.config["trainer"]["default_root_dir"]) / "record" / str(result._id) / "metrics.json"
    metric = json.loads(record.read_text())[name]
    return dict(zip(metric["steps"], metric["values"]))


def _killed_then_resumed(data, root, kill_file, kill_step):
    """Run in a subprocess killed right after ``kill_file*`` is written at ``kill_step``; resume with ckpt_path=last."""
    updates = demo_updates(data, root)
    args = root.parent / f"{root.name}.json"
    args.write_text(json.dumps([updates, kill_file, kill_step]))
    script = root.parent / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    killed = subprocess.run([sys.executable, str(script), str(args)], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    newest = max((root / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name.startswith(kill_file) and torch.load(newest, map_location="cpu", weights_only=False)["global_step"] == kill_step
    updates["ckpt_path"] = "last"  # resumes from that newest checkpoint
    return _run(updates)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return _run(demo_updates(data, tmp_path_factory.mktemp("uninterrupted") / "run"))


def _final_state(result):
    return torch.load(result.result["last_checkpoint"], map_location="cpu", weights_only=False)


@pytest.mark.parametrize(
    "kill_file, kill_step",
    [("last.ckpt", 3), ("step-", 2 * STEP_CHECKPOINTS)],
    ids=["killed-at-epoch-boundary", "killed-mid-epoch"],
)
def test_killed_and_resumed_run_ends_like_the_uninterrupted_one(data, tmp_path, uninterrupted, kill_file, kill_step, caplog):
    with caplog.at_level(logging.INFO, logger="ex_maest"):
        resumed = _killed_then_resumed(data, tmp_path / "run", kill_file, kill_step)
    per_epoch = EPOCH_LENGTH // BATCH_SIZE
    where = f"epoch {kill_step // per_epoch - 1} complete" if kill_step % per_epoch == 0 else \
        f"{kill_step % per_epoch} batch(es) of epoch {kill_step // per_epoch} done, the rest of it trains next"
    assert f"{where} (global step {kill_step})" in caplog.text  # the command says where it goes on from
    expected, got = uninterrupted.result, resumed.result
    assert got["global_step"] == expected["global_step"] == EPOCHS * EPOCH_LENGTH // BATCH_SIZE
    for key in ("val_roc", "val_roc_swa", "val_loss", "val_loss_swa", "val_ap", "train_loss_epoch"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-6), key
    # Every epoch the resumed run logs has the uninterrupted run's training loss: the one it resumed in
    # too (the mean over all its batches, those before the kill included, from the checkpoint).
    resumed_epochs, whole = _epoch_metric(resumed, "train_loss_epoch"), _epoch_metric(uninterrupted, "train_loss_epoch")
    assert sorted(whole) == list(range(EPOCHS)) and sorted(resumed_epochs) == list(range(kill_step // per_epoch, EPOCHS))
    for epoch, value in resumed_epochs.items():
        assert value == pytest.approx(whole[epoch], abs=1e-6), epoch
    # The step checkpoint the run resumed from goes once a newer one is written, as in the uninterrupted run
    # (Lightning would keep it). (The killer stops the run right after it wrote step 4, before it removed
    # step 2: that one stays, as it would after any kill in that instant.)
    def step_checkpoints(result):
        return sorted(p.name for p in Path(result.result["last_checkpoint"]).parent.glob("step-*.ckpt"))

    newest = f"step-step={EPOCHS * per_epoch - 1}.ckpt"
    assert step_checkpoints(uninterrupted) == [newest]
    assert newest in step_checkpoints(resumed) and f"step-step={kill_step}.ckpt" not in step_checkpoints(resumed)
    want, have = _final_state(uninterrupted), _final_state(resumed)
    assert set(have["state_dict"]) == set(want["state_dict"])
    for key, value in want["state_dict"].items():  # net.*, net_swa.* and the SWA count
        torch.testing.assert_close(have["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert have["lr_schedulers"] == want["lr_schedulers"]


def test_ckpt_path_last_takes_the_newest_checkpoint_of_the_run(data, tmp_path, caplog):
    from ex_maest import _resolve_ckpt_path
    from models.checkpoints import SAVED_AT_KEY

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    trainer = type("T", (), {"default_root_dir": str(tmp_path)})()
    with pytest.raises(FileNotFoundError, match="last.ckpt does not exist: nothing to resume"):
        _resolve_ckpt_path("last", trainer)
    torch.save({"global_step": 30}, folder / "last.ckpt")  # an older version's files: no time inside, their mtimes count
    assert _resolve_ckpt_path("last", trainer) == str(folder / "last.ckpt")
    step = folder / "step-step=40.ckpt"
    torch.save({"global_step": 40}, step)
    newer = (folder / "last.ckpt").stat().st_mtime_ns + 10**9
    os.utime(step, ns=(newer, newer))
    assert _resolve_ckpt_path("last", trainer) == str(step)
    # The time training wrote inside decides, not the mtime (cp -r gives every file the copy's time).
    torch.save({"global_step": 50, SAVED_AT_KEY: 2 * 10**18}, folder / "last.ckpt")
    torch.save({"global_step": 45, SAVED_AT_KEY: 1 * 10**18}, step)
    os.utime(step, ns=(newer + 10**9, newer + 10**9))
    assert _resolve_ckpt_path("last", trainer) == str(folder / "last.ckpt")
    (folder / "last.ckpt").write_bytes(b"cut short")  # an unreadable file is passed over, named
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        assert _resolve_ckpt_path("last", trainer) == str(step)
    assert f"{folder / 'last.ckpt'} cannot be read, so it is passed over as the newest checkpoint" in caplog.text


def test_a_run_resumed_in_a_copied_folder_keeps_its_last_and_best_checkpoints(data, tmp_path, uninterrupted, caplog):
    """Lightning reloads its checkpoint callbacks' state only in the folder that wrote it: in a copied (or moved) run
    folder it wrote last-v1.ckpt beside a stale last.ckpt, which README's commands read. cp -r also gives every file
    the copy's time, so the step checkpoint looked newer than last.ckpt."""
    import shutil

    original = Path(uninterrupted.config["trainer"]["default_root_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in (original / "checkpoints").iterdir()}
    copy = tmp_path / "copied"
    shutil.copytree(original, copy, copy_function=shutil.copy)  # as cp -r: contents, not times
    step = copy / "checkpoints" / f"step-step={EPOCHS * EPOCH_LENGTH // BATCH_SIZE - 1}.ckpt"
    later = (copy / "checkpoints" / "last.ckpt").stat().st_mtime_ns + 10**9
    os.utime(step, ns=(later, later))  # copied after last.ckpt
    updates = demo_updates(data, copy)
    updates["ckpt_path"], updates["trainer"]["max_epochs"] = "last", EPOCHS + 1
    with caplog.at_level(logging.INFO, logger="ex_maest"), caplog.at_level(logging.INFO, logger="helpers.resume"):
        resumed = _run(updates)

    assert f"resuming from {copy / 'checkpoints' / 'last.ckpt'}: epoch {EPOCHS - 1} complete" in caplog.text
    assert "dirpath has changed" not in caplog.text and "is not the training data this run had" not in caplog.text
    assert caplog.text.count(f"checkpoints of {original / 'checkpoints'} resumed in {copy / 'checkpoints'}") == 1
    files = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in files and len([f for f in files if f.endswith("-best.ckpt")]) == 1, files
    assert [f for f in files if f.startswith("step-")] == ["step-step=10.ckpt"]  # every 2 steps; 12 ends the epoch: last.ckpt
    last = torch.load(copy / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == resumed.result["global_step"] == (EPOCHS + 1) * EPOCH_LENGTH // BATCH_SIZE
    assert resumed.result["last_checkpoint"] == str(copy / "checkpoints" / "last.ckpt")
    assert {p.name: p.stat().st_mtime_ns for p in (original / "checkpoints").iterdir()} == before  # the original untouched


def test_a_resume_on_other_training_data_says_so(data, tmp_path, uninterrupted, caplog):
    """Prepared again with files added, the same command resumed silently on other data ("resume is exact")."""
    import shutil

    from helpers.melfiles import save_groundtruth

    copy = tmp_path / "run"
    shutil.copytree(Path(uninterrupted.config["trainer"]["default_root_dir"]), copy)
    gt = load_groundtruth(data["groundtruth_train"])
    fewer = save_groundtruth(tmp_path / "gt-train.pk", dict(list(gt.items())[:-2]))
    updates = demo_updates(data, copy)
    updates["ckpt_path"], updates["trainer"]["max_epochs"] = "last", EPOCHS + 1
    updates["datamodule"]["groundtruth_train"] = str(fewer)
    with caplog.at_level(logging.WARNING, logger="helpers.datamodule"):
        _run(updates)
    assert f"datamodule.groundtruth_train ({fewer}, {len(gt) - 2} tracks) is not the training data this run had until the " \
           f"checkpoint ({len(gt)} tracks, or other labels)" in caplog.text


def test_a_resume_in_a_copied_folder_compares_the_keys_with_the_record_of_the_run_that_wrote_it(tmp_path, monkeypatch, caplog):
    """cp -r outputs/run outputs/copy: the copy has no Sacred record under its name; the checkpoint says where it was written."""
    from types import SimpleNamespace

    import ex_maest

    monkeypatch.setenv("MAEST_SACRED_DIR", str(tmp_path / "records"))
    (tmp_path / "records" / "1").mkdir(parents=True)
    (tmp_path / "records" / "1" / "config.json").write_text(json.dumps({"run_name": "myrun", "seed": 0, "trainer": {"max_epochs": 3}}))
    checkpoint = tmp_path / "outputs" / "copy" / "train" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"callbacks": {"EpochCheckpoint{'monitor': 'val_loss'}": {"dirpath": "/data/outputs/myrun/train/checkpoints"}}}, checkpoint)
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        ex_maest._warn_changed_keys(SimpleNamespace(observers=[]), {"run_name": "copy", "seed": 0, "trainer": {"max_epochs": 4}}, str(checkpoint))
    assert "resuming run myrun under other keys than its Sacred record's: trainer.max_epochs 3 there, 4 here" in caplog.text


# ------------------------------------------------------------------ the parts
@pytest.mark.parametrize("cls", ["balanced", "random"])
@pytest.mark.parametrize("replacement", [True, False])
def test_sampler_resumes_mid_epoch_with_the_remaining_draws(cls, replacement):
    labels = np.eye(4, dtype=bool)[np.arange(40) % 4]

    def make(rank=0):
        kwargs = dict(epoch_length=30, seed=3, rank=rank, world_size=2, replacement=replacement)
        return BalancedSampler(labels=labels, **kwargs) if cls == "balanced" else RandomEpochSampler(n_items=40, **kwargs)

    sampler = make(rank=1)
    sampler.set_epoch(2)
    whole = list(sampler)
    assert [(d.epoch, d.position) for d in whole] == [(2, p) for p in range(1, 30, 2)]  # positions in the whole draw
    resumed = make(rank=1)
    resumed.resume(epoch=2, start=6)
    rest = list(resumed)
    assert rest == whole[6:] and [d.position for d in rest] == [d.position for d in whole[6:]]
    assert list(resumed) == whole  # only the first iteration after resume starts late
    resumed.resume(epoch=2, start=len(resumed))
    assert list(resumed) == []
    with pytest.raises(ValueError, match="cannot resume at index 16 of an epoch of 15"):
        resumed.resume(epoch=2, start=16)


@pytest.mark.parametrize("before,after", [((8, 2), (8, 1)), ((8, 1), (8, 2)), ((8, 2), (5, 3)), ((4, 3), (4, 3))])
def test_resuming_on_another_layout_trains_every_remaining_draw_once(before, after):
    """Killed after 2 batches on every rank of one layout (batch size, ranks), resumed on another: the
    positions trained before and after the kill are the epoch's draw, each exactly once."""
    from helpers.datamodule import resume_start

    epoch_length = 96

    def shard(rank, world_size):
        sampler = RandomEpochSampler(n_items=40, epoch_length=epoch_length, seed=3, rank=rank, world_size=world_size, replacement=True)
        sampler.set_epoch(1)
        return sampler

    (batch, ranks), (new_batch, new_ranks) = before, after
    done = [d.position for rank in range(ranks) for d in list(shard(rank, ranks))[: 2 * batch]]
    state = {"epoch": 1, "batches_done": 2, "batch_size": batch, "world_size": ranks}
    rest = []
    for rank in range(new_ranks):
        sampler = shard(rank, new_ranks)
        sampler.resume(1, resume_start(state, rank, new_ranks, len(sampler)))
        rest += [d.position for d in sampler]
    assert sorted(done + rest)[:epoch_length] == list(range(epoch_length))  # every draw once (padding aside)
    assert not set(done) & set(rest)


def test_draw_is_an_int_that_survives_pickling():
    import pickle

    draw = Draw(7, epoch=3, position=11)
    assert draw == 7 and isinstance(draw, int) and np.arange(10)[draw] == 7
    again = pickle.loads(pickle.dumps(draw))
    assert (int(again), again.epoch, again.position) == (7, 3, 11)


def _datamodule(data, num_workers, **kwargs):
    return maest_datamodule(
        base_dir=data["base_dir"], clip_length=1, groundtruth_train=data["groundtruth_train"], batch_size_train=4,
        epoch_length=16, num_workers=num_workers, seed=5, **kwargs,
    )


def test_crops_depend_on_the_draw_not_on_workers_or_global_rng(data):
    torch.manual_seed(0)
    batches = [x for x, _, _ in _datamodule(data, num_workers=0).train_dataloader()]
    torch.manual_seed(1)  # another global state: the same crops
    assert all(torch.equal(a, b) for a, b in zip(batches, [x for x, _, _ in _datamodule(data, num_workers=0).train_dataloader()]))
    with_workers = [x for x, _, _ in _datamodule(data, num_workers=2).train_dataloader()]
    assert len(with_workers) == len(batches) == 4
    assert all(torch.equal(a, b) for a, b in zip(batches, with_workers))
    # Crops move: two draws of one track in other epochs or positions start elsewhere.
    ds = TrainDataset(reader=MelReader(data["base_dir"]), groundtruth=load_groundtruth(data["groundtruth_train"]), n_frames=10, seed=5)
    starts = {ds.crop_start(Draw(0, epoch=e, position=p), total=200) for e in range(3) for p in range(5)}
    assert len(starts) > 8 and all(0 <= s <= 190 for s in starts)


def test_data_loaders_leave_the_global_random_state_alone(data):
    """A resumed run creates its iterators anew: they must not draw on the RNG that training uses."""
    dm = maest_datamodule(
        base_dir=data["base_dir"], clip_length=1, groundtruth_train=data["groundtruth_train"],
        groundtruth_val=data["groundtruth_val"], epoch_length=8, num_workers=0,
    )
    dm.setup("fit")
    before = torch.get_rng_state()
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), before)


def test_train_loader_state_round_trip_skips_the_batches_already_trained(data):
    dm = _datamodule(data, num_workers=0)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    whole = [(x, keys) for x, keys, _ in loader]
    loader.batches_done = lambda: 3  # the fit loop had processed 3 batches when the checkpoint was taken
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 3, "batch_size": 4, "world_size": 1}
    fresh = _datamodule(data, num_workers=0).train_dataloader()
    fresh.load_state_dict(state)
    rest = [(x, keys) for x, keys, _ in fresh]
    assert len(rest) == 1 and rest[0][1] == whole[3][1] and torch.equal(rest[0][0], whole[3][0])
    assert len(fresh) == 4  # Lightning still sees the whole epoch and counts the rest itself


def test_random_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "state.pt"
    torch.save(get_random_state(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_random_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_resuming_a_run_under_other_keys_says_which(data, tmp_path, uninterrupted, monkeypatch, caplog):
    """run_name (or a checkpoint path) forces the folder of a run whose Sacred record has other keys: a warning names them."""
    monkeypatch.setenv("MAEST_SACRED_DIR", str(Path(uninterrupted.config["trainer"]["default_root_dir"]) / "record"))
    updates = demo_updates(data, tmp_path / "again")
    updates.update(seed=5, run_name=uninterrupted.config["run_name"], ckpt_path=uninterrupted.result["last_checkpoint"])
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        _run(updates)  # the run had ended: nothing more to train
    assert (f"resuming run {uninterrupted.config['run_name']} under other keys than its Sacred record's: seed 0 there, 5 here. "
            "The checkpoint brings the weights") in caplog.text

    caplog.clear()
    updates["seed"] = 0  # the run's own keys: nothing to say
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        _run(updates)
    assert "under other keys" not in caplog.text
