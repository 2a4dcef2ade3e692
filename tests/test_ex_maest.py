"""ex_maest.py pre-training: Sacred runs of the demo and teacher-student configs on a tiny synthetic
dataset, checkpoints, resume, `test`, `compute_norm_stats`, `model_speed_test`, every named config."""

from __future__ import annotations

import json
import logging
import re

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ex_maest import ex
from helpers.melfiles import MelReader, load_groundtruth
from helpers.metrics import macro_metrics
from helpers.synthetic import make_synthetic_dataset
from models import get_maest
from models.mel import n_frames_for
from models.registry import build_config, get_spec
from tests.builders import maest_datamodule

CLIP_LENGTH = 2  # seconds: 125 frames
INPUT_T = 125
EPOCH_LENGTH = 32
BATCH_SIZE = 8
STEPS_PER_EPOCH = EPOCH_LENGTH // BATCH_SIZE
TINY_MAEST = {"arch": "maest-tiny", "pretrained": False, "input_t": INPUT_T, "s_patchout_t": 3, "s_patchout_f": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_tracks=40, clip_length=float(CLIP_LENGTH))


def tiny_updates(data, root, **trainer):
    """Config updates that shrink any named config to seconds on a CPU."""
    return {
        "seed": 0,  # Sacred seeds torch with it: reproducible runs
        "synthetic_data": {"out_dir": None},
        "inference_checkpoint": None,
        "datamodule": {
            "base_dir": data["base_dir"],
            "groundtruth_train": data["groundtruth_train"],
            "groundtruth_val": data["groundtruth_val"],
            "groundtruth_test": data["groundtruth_test"],
            "groundtruth_predict": data["groundtruth_all"],
            "clip_length": CLIP_LENGTH,
            "epoch_length": EPOCH_LENGTH,
            "sampler_replacement": True,  # 32 draws from ~20 tracks (the released recipe draws without replacement)
            "batch_size_train": BATCH_SIZE,
            "batch_size_test": 16,
            "num_workers": 0,
        },
        "maest": dict(TINY_MAEST),
        "module": {"swa_epoch_start": 0, "swa_freq": 1},
        "trainer": {
            "max_epochs": 2,
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "precision": "32-true",
            "enable_progress_bar": False,
            "enable_model_summary": False,  # Lightning Trainer arguments the ingredient does not list
            "logger": False,
            **trainer,
        },
    }


def run(command="main", named_configs=(), updates=None):
    return ex.run(command, named_configs=list(named_configs), config_updates=updates or {}, options={"--loglevel": "ERROR"})


@pytest.fixture(scope="module")
def demo_run(data, tmp_path_factory):
    """The demo config, tiny, 2 epochs with SWA over both."""
    root = tmp_path_factory.mktemp("demo")
    return run("main", ["demo"], tiny_updates(data, root))


def _split_state(path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    net = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    swa = {k[len("net_swa.") :]: v for k, v in state.items() if k.startswith("net_swa.")}
    return state, net, swa


# ---------------------------------------------------------------------------------- training
def test_demo_trains_and_writes_best_and_last_checkpoints(demo_run):
    assert demo_run.status == "COMPLETED"
    result = demo_run.result
    assert result["global_step"] == 2 * STEPS_PER_EPOCH
    assert result["best_checkpoint"].endswith("-best.ckpt") and result["last_checkpoint"].endswith("last.ckpt")
    for key in ("val_loss", "val_roc", "val_ap", "val_loss_swa", "val_roc_swa", "train_loss_epoch"):
        assert np.isfinite(result["metrics"][key]), key
    assert 0.0 <= result["metrics"]["val_roc"] <= 1.0
    for path in (result["best_checkpoint"], result["last_checkpoint"]):
        state, net, swa = _split_state(path)
        assert net and set(net) == set(swa)
        epoch = torch.load(path, map_location="cpu", weights_only=False)["epoch"]
        assert state["swa_n_averaged"].item() == epoch + 1  # every epoch from 0 (swa_epoch_start=0, swa_freq=1)
    assert torch.load(result["last_checkpoint"], map_location="cpu", weights_only=False)["epoch"] == 1
    assert demo_run.config["maest"]["n_classes"] == 10 and demo_run.config["trainer"]["logger"] is False


def test_training_report_says_how_many_classes_validation_scored(capsys):
    from types import SimpleNamespace

    from ex_maest import _report

    result = {"metrics": {"val_roc": 1.0, "val_ap": 1.0, "val_loss": 0.1, "val_n_classes_scored": 1.0},
              "best_checkpoint": "b.ckpt", "last_checkpoint": "l.ckpt", "logs": "logs"}
    _report(SimpleNamespace(observers=[]), result, n_classes=5)
    out = capsys.readouterr().out
    assert "val_roc      1.0000  (over the 1 of 5 classes with positive and negative files in validation)" in out
    assert "val_loss     0.1000\n" in out  # the loss covers every class
    _report(SimpleNamespace(observers=[]), {**result, "metrics": {**result["metrics"], "val_n_classes_scored": 5.0}}, n_classes=5)
    assert "present in validation" not in capsys.readouterr().out


def test_trained_checkpoint_loads_with_get_maest(demo_run):
    last = demo_run.result["last_checkpoint"]
    _, net_weights, swa_weights = _split_state(last)
    options = dict(n_classes=10, input_t=INPUT_T)
    swa = get_maest("maest-tiny", checkpoint=last, **options)
    plain = get_maest("maest-tiny", checkpoint=last, checkpoint_swa_weights=False, **options)
    for model, expected in ((swa, swa_weights), (plain, net_weights)):
        assert not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k
    # SWA averaged two different epochs: the two weight sets differ.
    assert not torch.equal(swa.head[1].weight, plain.head[1].weight)
    x = torch.randn(2, 96, INPUT_T)
    assert swa(x).shape == (2, 10)


def test_test_command_scores_every_test_clip(demo_run, data, tmp_path):
    last = demo_run.result["last_checkpoint"]
    updates = tiny_updates(data, tmp_path / "test")
    updates["maest"]["checkpoint"] = last
    r = run("test", ["demo"], updates)
    assert r.status == "COMPLETED"
    results = r.result

    # The same numbers from the SWA weights over every clip of every test file, tail included.
    net = get_maest("maest-tiny", checkpoint=last, n_classes=10, input_t=INPUT_T)
    dm = maest_datamodule(base_dir=data["base_dir"], clip_length=CLIP_LENGTH, groundtruth_test=data["groundtruth_test"], batch_size_test=64)
    dm.setup("test")
    n_files = len(load_groundtruth(data["groundtruth_test"]))
    assert len(dm.dataset("test")) > n_files  # tracks are 0.8-1.4 clips long: some give two clips
    x, _, y = next(iter(dm.test_dataloader()))
    assert len(x) == len(dm.dataset("test"))
    with torch.no_grad():
        logits = net(x)
    expected = macro_metrics(y.numpy(), torch.sigmoid(logits).numpy())
    assert results["test_roc"] == pytest.approx(expected["roc_auc"], abs=1e-5)
    assert results["test_ap"] == pytest.approx(expected["pr_auc"], abs=1e-5)
    assert results["test_loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item(), abs=1e-5)
    assert not any(key.endswith("_swa") for key in results)  # one network is tested: no copy of it scored as "swa"


def test_test_command_reads_only_the_test_ground_truth(demo_run, data, tmp_path):
    updates = tiny_updates(data, tmp_path / "test")
    updates["maest"]["checkpoint"] = demo_run.result["last_checkpoint"]
    updates["datamodule"]["groundtruth_train"] = str(tmp_path / "not-there.pk")  # never opened by `test`
    assert run("test", ["demo"], updates).status == "COMPLETED"
    updates["datamodule"]["groundtruth_test"] = None
    with pytest.raises(ValueError, match="set datamodule.groundtruth_test to the ground-truth pickle of the tracks to test"):
        run("test", ["demo"], updates)


def test_inference_checkpoint_replaces_maest_checkpoint_in_test(demo_run, data, tmp_path):
    updates = tiny_updates(data, tmp_path / "test")
    updates["inference_checkpoint"] = demo_run.result["last_checkpoint"]
    updates["maest"]["checkpoint_swa_weights"] = False
    results = run("test", ["demo"], updates).result
    net = get_maest("maest-tiny", checkpoint=demo_run.result["last_checkpoint"], checkpoint_swa_weights=False, n_classes=10, input_t=INPUT_T)
    dm = maest_datamodule(base_dir=data["base_dir"], clip_length=CLIP_LENGTH, groundtruth_test=data["groundtruth_test"], batch_size_test=64)
    dm.setup("test")
    x, _, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(net(x), y).item()
    assert results["test_loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("command", ["test", "extract_embeddings", "extract_logits", "extract_timestamps", "predict", "export_hf", "export_onnx"])
def test_inference_without_weights_is_refused_unless_random_weights_are_asked_for(command, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    updates = tiny_updates(data, tmp_path / "root")
    updates["predict"] = {"out_dir": str(tmp_path / "out"), "audio": ["x.wav"], "num_workers": 0}
    with pytest.raises(ValueError) as error:
        run(command, ["demo"], updates)  # no checkpoint, maest.pretrained=False
    message = str(error.value)
    assert message.startswith(f"{command} has no weights to load: neither inference_checkpoint, maest.checkpoint nor maest.pretrained is set")
    assert "maest-tiny network would be randomly initialised" in message and "maest.allow_random_weights=True" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()  # refused before any output


@pytest.mark.parametrize("command", ["test", "extract_embeddings"])
def test_a_missing_checkpoint_is_said_before_the_demo_data_is_generated(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo generates its data in outputs/demo/data, relative to here
    with pytest.raises(FileNotFoundError, match="checkpoint missing.ckpt does not exist"):
        run(command, ["demo"], {"inference_checkpoint": "missing.ckpt"})
    assert not (tmp_path / "outputs" / "demo" / "data").exists()


def test_random_weights_on_purpose_extract(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "root")
    updates["maest"]["allow_random_weights"] = True
    updates["predict"] = {"out_dir": str(tmp_path / "out"), "num_workers": 0}
    assert run("extract_logits", ["demo"], updates).result["written"] == len(load_groundtruth(data["groundtruth_all"]))


def test_resume_continues_epochs_and_steps(data, tmp_path, caplog):
    root = tmp_path / "resume"
    first = run("main", ["demo"], tiny_updates(data, root, max_epochs=1))
    last = root / "checkpoints" / "last.ckpt"
    assert first.result["global_step"] == STEPS_PER_EPOCH
    first_state = torch.load(last, map_location="cpu", weights_only=False)
    assert first_state["epoch"] == 0 and first_state["global_step"] == STEPS_PER_EPOCH

    updates = tiny_updates(data, root, max_epochs=2)
    updates["ckpt_path"] = "last"
    with caplog.at_level(logging.INFO, logger="ex_maest"):
        second = run("main", ["demo"], updates)
    assert second.status == "COMPLETED"
    assert f"resuming from {last}: epoch 0 complete (global step {STEPS_PER_EPOCH})" in caplog.text
    assert second.result["global_step"] == 2 * STEPS_PER_EPOCH  # one more epoch, not two from scratch
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 2 * STEPS_PER_EPOCH
    assert state["lr_schedulers"][0]["last_epoch"] == 2  # the schedule continued too
    assert state["state_dict"]["swa_n_averaged"].item() == 2
    # The optimiser state was restored: Adam's step count covers both epochs.
    steps = {int(s["step"]) for s in state["optimizer_states"][0]["state"].values()}
    assert steps == {2 * STEPS_PER_EPOCH}


def test_a_second_fresh_run_in_one_folder_is_the_one_last_names(data, tmp_path, caplog):
    import ex_maest

    root = tmp_path / "twice"
    first = run("main", ["demo"], tiny_updates(data, root, max_epochs=1))
    assert Path(first.result["last_checkpoint"]).name == "last.ckpt"
    updates = tiny_updates(data, root, max_epochs=1)
    updates["seed"] = 1  # another model, same folder (the demo's variants share outputs/demo)
    with caplog.at_level(logging.WARNING, logger="ex_maest"):
        second = run("main", ["demo"], updates)
    assert "holds the checkpoints of an earlier run (newest: last.ckpt); this run starts afresh" in caplog.text
    last = Path(second.result["last_checkpoint"])
    assert last.name == "last-v1.ckpt" and last.is_file()  # Lightning kept the first run's last.ckpt
    assert ex_maest._newest_checkpoint(root / "checkpoints") == last  # what ckpt_path=last and inference_checkpoint=last take
    weights = torch.load(last, weights_only=False)["state_dict"]["net_swa.head.1.weight"]
    updates["inference_checkpoint"] = "last"
    updates["predict"] = {"out_dir": str(tmp_path / "logits"), "num_workers": 0}
    extracted = run("extract_logits", ["demo"], updates)
    assert json.loads((tmp_path / "logits" / "config.json").read_text())["checkpoint"] == str(last)
    assert not torch.equal(weights, torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]["net_swa.head.1.weight"])
    assert extracted.result["written"] > 0


def test_a_second_training_into_a_folder_in_use_is_refused_and_the_other_ranks_share_it(data, tmp_path, monkeypatch):
    """Two runs of one command line at once wrote into each other's checkpoints (last-v1.ckpt, two best files)."""
    from helpers.files import folder_lock, launching_process

    root = tmp_path / "busy"
    updates = tiny_updates(data, root, max_epochs=1)
    with folder_lock(root):  # the first run, still training
        with pytest.raises(RuntimeError, match=rf"another run is writing into {root} \(it holds {root / '.lock'}\): wait for it "
                                               r"to end, or give this one its own folder \(trainer.default_root_dir=\.\.\.\)"):
            run("main", ["demo"], updates)
        assert not (root / "checkpoints").exists()
        monkeypatch.setenv("LOCAL_RANK", "1")  # a rank the first run started: it trains into the run's folder
        assert not launching_process()
        assert run("main", ["demo"], updates).result["global_step"] > 0
    monkeypatch.delenv("LOCAL_RANK")
    assert launching_process() and not launching_process({"SLURM_PROCID": "2"}) and not launching_process({"NODE_RANK": "1"})
    updates["ckpt_path"] = "last"  # the folder is free again (a killed run's lock goes with its process)
    updates["trainer"]["max_epochs"] = 2
    assert run("main", ["demo"], updates).result["global_step"] > 0


def test_resume_from_last_without_a_checkpoint_says_so(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "empty")
    updates["ckpt_path"] = "last"
    with pytest.raises(FileNotFoundError, match="last.ckpt does not exist: nothing to resume") as error:
        run("main", ["demo"], updates)
    assert "stopped before its first checkpoint" not in str(error.value)
    (tmp_path / "empty" / "lightning_logs" / "version_0").mkdir(parents=True)  # what a run killed in its first epoch leaves
    with pytest.raises(FileNotFoundError, match=r"nothing to resume\. A run of this config started in .*empty but was stopped "
                                                r"before its first checkpoint: rerun the same command without ckpt_path=last"):
        run("main", ["demo"], updates)


def test_resuming_from_a_file_that_is_not_this_configs_training_checkpoint_says_what_differs(demo_run, data, tmp_path):
    from models.checkpoints import CheckpointError

    last = demo_run.result["last_checkpoint"]
    bare = tmp_path / "bare.pt"
    torch.save(get_maest("maest-tiny", n_classes=10, input_t=INPUT_T).state_dict(), bare)
    updates = tiny_updates(data, tmp_path / "resume")
    updates["ckpt_path"] = str(bare)
    with pytest.raises(CheckpointError, match=r"bare.pt is not a training checkpoint .*give it as maest.checkpoint=FILE"):
        run("main", ["demo"], updates)

    updates["ckpt_path"] = last
    updates["maest"]["input_t"] = 2 * INPUT_T  # another network (a longer time embedding) than the one that wrote the checkpoint
    with pytest.raises(CheckpointError) as error:
        run("main", ["demo"], updates)
    message = str(error.value)
    assert f"holds another network than this config builds (its model: arch maest-tiny, embed_dim=64, depth=2, num_heads=4, n_classes=10, input_t={INPUT_T}" in message
    assert "1 weights differ, e.g. time_new_pos_embed: (1, 64, 1, 12) there, (1, 64, 1, 25) here" in message
    assert "Resume it with the named configs and keys that trained it" in message
    assert not (tmp_path / "resume" / "checkpoints").exists() or not any((tmp_path / "resume" / "checkpoints").iterdir())


def test_training_without_validation_set_checkpoints_every_n_steps(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "noval", limit_train_batches=3)  # any Lightning Trainer argument
    updates["datamodule"]["groundtruth_val"] = None
    updates["checkpoint_every_n_train_steps"] = 2
    r = run("main", ["demo"], updates)
    assert r.status == "COMPLETED"
    assert r.result["global_step"] == 2 * 3
    assert not any(k.startswith("val_") for k in r.result["metrics"])
    checkpoints = tmp_path / "noval" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    (step_checkpoint,) = checkpoints.glob("step-*.ckpt")  # save_top_k=1: the latest step
    # Steps 2, 4 (step 6 is an epoch's last batch: last.ckpt covers it, see helpers.resume.StepCheckpoint)
    assert torch.load(step_checkpoint, map_location="cpu", weights_only=False)["global_step"] == 4
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6


def test_trainer_arguments_set_by_the_experiment_are_refused(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "x")
    updates["trainer"]["use_distributed_sampler"] = True
    with pytest.raises(ValueError, match="trainer.use_distributed_sampler cannot be configured"):
        run("main", ["demo"], updates)


def test_teacher_student_pretrain_trains_on_teacher_logits(data, tmp_path):
    teacher_dir = tmp_path / "teacher"
    rng = np.random.default_rng(0)
    for key in load_groundtruth(data["groundtruth_train"]):
        path = teacher_dir / f"{key}.logits.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.normal(-1.0, 2.0, size=(2, 10)).astype(np.float32))  # (n_clips, n_classes)
    updates = tiny_updates(data, tmp_path / "ts", max_epochs=1)
    updates["datamodule"]["teacher_dir"] = str(teacher_dir)
    updates["datamodule"]["num_workers"] = 2  # teacher targets are read (and cached) in the workers
    updates["maest"] = dict(TINY_MAEST)  # maest-tiny, no pretrained weights, 2 s clips

    r = run("main", ["maest_30s_teacher_student_pretrain"], updates)

    assert r.status == "COMPLETED"
    assert r.config["maest"]["distilled_type"] == "separated" and r.config["module"]["teacher_student"] is True
    metrics = r.result["metrics"]
    assert metrics["train_loss_labels"] > 0 and metrics["train_loss_teacher"] > 0
    assert metrics["train_loss_labels"] != pytest.approx(metrics["train_loss_teacher"])
    assert metrics["train_loss_epoch"] == pytest.approx((metrics["train_loss_labels"] + metrics["train_loss_teacher"]) / 2, rel=1e-5)
    _, net, _ = _split_state(r.result["last_checkpoint"])
    model = get_maest("maest-tiny", checkpoint=r.result["last_checkpoint"], n_classes=10, input_t=INPUT_T, distilled_type="separated")
    assert "head_dist.weight" in net and model.config.distilled_type == "separated"


# ---------------------------------------------------------------------------------- other commands
def test_compute_norm_stats_equals_numpy(data, tmp_path, capsys):
    out = tmp_path / "stats" / "norm.json"
    updates = {"datamodule": {"base_dir": data["base_dir"], "groundtruth_train": data["groundtruth_train"]}, "norm_stats_out": str(out)}
    r = run("compute_norm_stats", updates=updates)
    reader = MelReader(data["base_dir"])
    keys = list(load_groundtruth(data["groundtruth_train"]))
    values = np.concatenate([reader.read(k).astype(np.float64).ravel() for k in keys])
    assert r.result["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert r.result["std"] == pytest.approx(values.std(), rel=1e-6)
    assert r.result["n_files"] == len(keys) and r.result["failed"] == {}
    assert r.result["n_frames"] == values.size // 96
    assert json.loads(out.read_text()) == r.result
    # the models' normalisation is fixed: the output says so and compares
    shift = (values.mean() - 2.06755686098554) / 1.268292820667291
    assert (f"for comparison only (no setting reads norm.json): the models normalise their input with the Discogs training set's "
            f"mean 2.067557 and std 1.268293, fixed because the released weights expect them; the mean of these training mels "
            f"(datamodule.groundtruth_train) lies {abs(shift):.2f} of that std {'below' if shift < 0 else 'above'} it") in capsys.readouterr().out


def test_model_speed_test_reports_throughput():
    updates = {"maest": dict(TINY_MAEST), "speed_test_batch_size": 2, "speed_test_iterations": 2, "predict": {"device": "cpu"}}
    r = run("model_speed_test", updates=updates)
    assert r.result["clips_per_s"] > 0 and r.result["device"] == "cpu"
    assert r.result["clips_per_s"] == pytest.approx(2 / r.result["batch_seconds"])
    assert r.result["n_frames"] == INPUT_T  # the clip extraction and predict cut for this model


def test_threads_sets_torchs_cpu_threads_for_the_command(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)  # the test process keeps its own threads
    updates = {"maest": dict(TINY_MAEST), "speed_test_batch_size": 1, "speed_test_iterations": 1, "predict": {"device": "cpu"}}
    run("model_speed_test", updates={**updates, "threads": 1})
    assert seen == [1]
    run("model_speed_test", updates=updates)  # None: torch's default, untouched
    assert seen == [1]


def test_model_speed_test_says_when_the_share_is_over_100_percent(monkeypatch, capsys):
    import models.precision

    ceilings = iter([0.001, 0.0005, 200.0, 1.0])  # fp32: before and after the timing (the best is taken); bf16 (a tiny model runs at ~0.3-3 GFLOP/s)
    monkeypatch.setattr(models.precision, "matmul_gflops", lambda *a, **k: next(ceilings))
    updates = {"maest": dict(TINY_MAEST), "speed_test_batch_size": 2, "speed_test_iterations": 1, "predict": {"device": "cpu"}}
    r = run("model_speed_test", updates=updates)
    assert [row["ceiling_gflops"] for row in r.result["rows"]] == [0.001, 200.0]
    lines = capsys.readouterr().out.splitlines()
    fp32, bf16 = (next(line for line in lines if line.startswith(p)) for p in ("fp32", "bf16"))
    assert "over 100 %: the machine was busier while the ceiling was measured" in fp32
    assert "over 100 %" not in bf16


def test_model_speed_test_times_the_demos_architecture_before_it_is_trained(tmp_path, capsys):
    """inference_checkpoint='last' (the demo's) with no checkpoint yet: the configured architecture is timed."""
    updates = {"trainer": {"default_root_dir": str(tmp_path / "train")}, "speed_test_batch_size": 1, "speed_test_iterations": 1,
               "predict": {"device": "cpu"}}
    r = run("model_speed_test", ["demo"], updates)
    assert r.result["clips_per_s"] > 0 and r.result["n_frames"] == 312  # the demo's 5 s clips
    lines = [line for line in capsys.readouterr().out.splitlines() if "clips/s" in line]
    assert len(lines) == 2 and all(f"GFLOP/s, cpu, {torch.get_num_threads()} threads)" in line for line in lines)  # the threads the ceiling used too
    assert not (tmp_path / "train").exists()
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):  # a path given is still checked
        run("model_speed_test", ["demo"], {**updates, "inference_checkpoint": str(tmp_path / "nothing.ckpt")})


def test_model_speed_test_times_a_released_architecture_without_its_weights(tmp_path):
    updates = {"maest": {"weights_dir": str(tmp_path)}, "speed_test_batch_size": 1, "speed_test_iterations": 1, "predict": {"device": "cpu"}}
    r = run("model_speed_test", ["maest_discogs_5sec_inference"], updates)  # pretrained=True, no weights file here
    assert r.result["n_frames"] == 312 and r.result["clips_per_s"] > 0


@pytest.mark.parametrize(
    "name, weights_file, url",
    [
        ("maest_10s_from_passt_pretrain", "passt-s-f128-p16-s10-ap.476-swa.pt",
         "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt"),
        ("maest_10s_from_deit_pretrain", "deit_base_distilled_patch16_384-d0272ac0.pth",
         "https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth"),
    ],
)
def test_missing_pretrained_weights_name_the_file_and_url(name, weights_file, url, tmp_path):
    # No data is read first: the weights are checked before the (large) ground truth is loaded.
    with pytest.raises(FileNotFoundError) as error:
        run("main", [name], {"maest.weights_dir": str(tmp_path)})
    message = str(error.value)
    assert str(tmp_path / weights_file) in message and url in message


# ---------------------------------------------------------------------------------- named configs
PASST, DEIT = "passt_s_swa_p16_128_ap476", "passt_deit_bd_p16_384"
PATCHOUT = {5: 15, 10: 30, 20: 60, 30: 90}
# SPEC §4: name -> (clip seconds, arch, pretrained)
PRETRAIN = {
    "maest_10s_random_weights_pretrain": (10, "maest-vit-b", False),
    "maest_10s_from_deit_pretrain": (10, DEIT, True),
    "maest_10s_from_passt_pretrain": (10, PASST, True),
    "maest_discogs_5sec_pretrain": (5, PASST, True),
    "maest_discogs_10sec_pretrain": (10, PASST, True),
    "maest_discogs_20sec_pretrain": (20, PASST, True),
    "maest_discogs_30sec_pretrain": (30, PASST, True),
    "maest_30s_teacher_student_pretrain": (30, PASST, True),
}
INFERENCE = {
    "maest_10s_random_weights_inference": (10, "discogs-maest-10s-fs-129e"),
    "maest_10s_from_deit_inference": (10, "discogs-maest-10s-dw-75e"),
    "maest_10s_from_passt_inference": (10, "discogs-maest-10s-pw-129e"),
    "maest_discogs_5sec_inference": (5, "discogs-maest-5s-pw-129e"),
    "maest_discogs_10sec_inference": (10, "discogs-maest-10s-pw-129e"),
    "maest_discogs_20sec_inference": (20, "discogs-maest-20s-pw-129e"),
    "maest_discogs_30sec_inference": (30, "discogs-maest-30s-pw-129e"),
    "maest_30s_from_passt_infer": (30, "discogs-maest-30s-pw-129e"),
    "maest_30s_teacher_student_inference": (30, "discogs-maest-30s-pw-73e-ts"),
    "maest_discogs_30sec_519l_inference": (30, "discogs-maest-30s-pw-129e-519l"),
}
OTHER = {"demo", "mini_train", "target_mtt"}


@pytest.fixture(scope="module")
def resolved():
    """Every named config resolved by Sacred (print_config runs nothing else)."""
    configs = {}
    for name in ex.named_configs:
        r = run("print_config", [name])
        assert r.status == "COMPLETED", name
        configs[name] = r.config
    return configs


def test_every_spec_name_is_registered(resolved):
    assert set(PRETRAIN) | set(INFERENCE) | OTHER <= set(resolved)
    for name in resolved:
        assert ex.named_configs[name].__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretrain_configs_have_the_paper_settings(resolved, name):
    seconds, arch, pretrained = PRETRAIN[name]
    config = resolved[name]
    maest = config["maest"]
    assert config["datamodule"]["clip_length"] == seconds
    assert maest["input_t"] == seconds * 16000 // 256 == n_frames_for(seconds)
    assert maest["s_patchout_t"] == PATCHOUT[seconds]
    assert (maest["arch"], maest["pretrained"]) == (arch, pretrained)
    expected_heads = "separated" if "teacher_student" in name else "mean"
    assert (maest["distilled_type"] or "mean") == expected_heads  # None: the arch's, "mean" for the init archs
    assert config["module"]["teacher_student"] is ("teacher_student" in name)


@pytest.mark.parametrize("name", sorted(INFERENCE))
def test_inference_configs_load_the_released_models(resolved, name):
    seconds, arch = INFERENCE[name]
    config = resolved[name]
    maest = config["maest"]
    assert config["datamodule"]["clip_length"] == seconds
    assert maest["input_t"] == seconds * 16000 // 256 == get_spec(arch).config["input_t"]
    assert maest["s_patchout_t"] == PATCHOUT[seconds]
    assert (maest["arch"], maest["pretrained"]) == (arch, True)
    heads = maest["distilled_type"] or build_config(arch).distilled_type  # None: the arch's
    assert heads == get_spec(arch).config.get("distilled_type", "mean")


def test_inference_twins_differ_from_pretrain_only_in_the_model(resolved):
    for name in PRETRAIN:
        twin = resolved[name.replace("_pretrain", "_inference")]
        pretrain = resolved[name]
        assert twin["datamodule"]["clip_length"] == pretrain["datamodule"]["clip_length"]
        assert twin["maest"]["arch"].startswith("discogs-maest-")
    alias, original = (
        {k: v for k, v in resolved[name].items() if k != "seed"}  # Sacred draws a seed per run
        for name in ("maest_30s_from_passt_infer", "maest_discogs_30sec_inference")
    )
    assert alias == original
    assert resolved["maest_discogs_30sec_519l_inference"]["maest"]["n_classes"] == 519


@pytest.mark.parametrize("name", sorted(set(PRETRAIN) | set(INFERENCE)))
def test_named_config_builds_its_network(resolved, name):
    """Every paper configuration builds (ViT-B on the meta device: no memory, no time)."""
    maest = resolved[name]["maest"]
    options = {k: maest[k] for k in ("input_f", "input_t", "s_patchout_t", "s_patchout_f", "u_patchout", "distilled_type")}
    with torch.device("meta"):
        net = get_maest(maest["arch"], pretrained=False, n_classes=maest["n_classes"] or 400, **options)
    assert net.config.embed_dim == 768 and net.config.depth == 12
    assert net.time_new_pos_embed.shape[-1] == maest["input_t"] // 10


def test_5s_patchout_keeps_half_of_the_time_columns(resolved):
    """5 s = 312 frames = 30 time patches; dropping 15 leaves 15 columns of 9 frequency patches."""
    maest = resolved["maest_discogs_5sec_pretrain"]["maest"]
    net = get_maest(
        "maest-tiny", n_classes=10, input_t=maest["input_t"], s_patchout_t=maest["s_patchout_t"],
        s_patchout_f=maest["s_patchout_f"],
    )
    x = torch.randn(2, 1, 96, maest["input_t"])
    assert net.config.patches(maest["input_t"]) == (9, 30)
    assert net.train().tokens(x).shape == (2, 2 + 9 * 15, 64)
    assert net.eval().tokens(x).shape == (2, 2 + 9 * 30, 64)
    assert net.train()(x).shape == (2, 10)


def test_demo_config_is_self_contained(resolved):
    demo = resolved["demo"]
    assert demo["synthetic_data"]["out_dir"] == demo["datamodule"]["base_dir"]
    assert demo["maest"]["pretrained"] is False and demo["maest"]["arch"] == "maest-demo"
    assert demo["maest"]["input_t"] == n_frames_for(demo["datamodule"]["clip_length"])
    # Its outputs are the documented outputs/demo/... folders, derived from run_name "demo".
    assert demo["run_name"] == "demo" and demo["trainer"]["default_root_dir"] is None
    assert demo["inference_checkpoint"] == "last"  # the newest of outputs/demo/train/checkpoints/ (ex_maest._inference_checkpoint)


def test_labels_other_than_the_models_are_refused_in_test_and_on_resume(data, tmp_path):
    from models.checkpoints import CheckpointError

    root = tmp_path / "named"
    names = [f"style_{i}" for i in range(10)]
    updates = tiny_updates(data, root, max_epochs=1)
    updates["datamodule"]["labels"] = names
    run("main", ["demo"], updates)
    last = str(root / "checkpoints" / "last.ckpt")

    test = {**tiny_updates(data, root), "inference_checkpoint": last}
    test["datamodule"]["labels"] = names
    assert run("test", ["demo"], test).result["test_loss"] > 0  # the model's labels: scored

    renamed = [*names[:3], "other", *names[4:]]  # one class renamed, as a re-prepared folder might have it
    test["datamodule"]["labels"] = renamed
    with pytest.raises(ValueError, match=rf"datamodule.labels are not the labels checkpoint {re.escape(last)} was trained on: "
                                         r"1 of 10 positions differ \(3: 'other' here, 'style_3' in the model\)"):
        run("test", ["demo"], test)
    test["datamodule"]["labels"] = names[::-1]
    with pytest.raises(ValueError, match=r"\(the same names in another order\): 10 of 10 positions differ"):
        run("test", ["demo"], test)

    resume = tiny_updates(data, root, max_epochs=2)
    resume["datamodule"]["labels"], resume["ckpt_path"] = renamed, "last"
    with pytest.raises(CheckpointError, match="resume with the ground truth and datamodule.labels of the run that wrote it"):
        run("main", ["demo"], resume)
    finetune = tiny_updates(data, tmp_path / "finetune", max_epochs=1)
    finetune["datamodule"]["labels"], finetune["maest"] = renamed, {**TINY_MAEST, "checkpoint": last}
    with pytest.raises(ValueError, match="or fine-tune it on these labels with maest.reinit_heads=True"):
        run("main", ["demo"], finetune)
    finetune["maest"]["reinit_heads"] = True
    assert run("main", ["demo"], finetune).status == "COMPLETED"  # other labels, new heads: allowed


def test_ctrl_c_in_training_is_an_interruption_not_a_failure(data, tmp_path, monkeypatch):
    from helpers.module import MAESTModule

    step = MAESTModule.training_step

    def pressed_at_the_third_step(self, batch, batch_idx):
        if self.global_step == 2:
            raise KeyboardInterrupt
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MAESTModule, "training_step", pressed_at_the_third_step)
    records = tmp_path / "records"
    with pytest.raises(KeyboardInterrupt):  # Lightning's sys.exit(1) after its graceful shutdown, turned back
        ex.run("main", named_configs=["demo"], config_updates=tiny_updates(data, tmp_path / "run", max_epochs=1),
               options={"--loglevel": "ERROR", "--file_storage": str(records)})
    assert json.loads((records / "1" / "run.json").read_text())["status"] == "INTERRUPTED"


def test_last_checkpoint_is_every_epochs_even_when_val_loss_does_not_improve(data, tmp_path):
    root = tmp_path / "flat"
    updates = tiny_updates(data, root, max_epochs=3)
    updates["module"] = {**updates["module"], "lr": 0.0}  # the weights never change: val_loss never improves after epoch 0
    result = run("main", ["demo"], updates).result
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (state["epoch"], state["global_step"]) == (2, 3 * STEPS_PER_EPOCH)  # Lightning alone left epoch 0's here
    assert Path(result["best_checkpoint"]).name.startswith("epoch=0-")


def test_teacher_student_without_a_teacher_folder_and_classes_other_than_the_datas_are_refused_up_front(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "ts", max_epochs=1)
    updates["module"] = {**updates["module"], "teacher_student": True}
    updates["maest"] = {**updates["maest"], "distilled_type": "separated"}
    with pytest.raises(ValueError, match=r"module.teacher_student=True trains the DIST head on a teacher's logits: set datamodule.teacher_dir"):
        run("main", ["demo"], updates)
    assert not (tmp_path / "ts").exists()  # before any work

    updates = tiny_updates(data, tmp_path / "classes", max_epochs=1)
    updates["maest"] = {**updates["maest"], "n_classes": 5}
    with pytest.raises(ValueError, match=r"maest.n_classes=5 but the ground truth has 10 classes: .*Leave maest.n_classes unset"):
        run("main", ["demo"], updates)

    updates = tiny_updates(data, tmp_path / "unused", max_epochs=1)
    updates["datamodule"]["teacher_dir"] = str(tmp_path)
    with pytest.raises(ValueError, match=r"but module.teacher_student=False: the teacher's logits would be read and checked but never trained on"):
        run("main", ["demo"], updates)


def test_mini_train_checks_a_pretraining_setup_on_a_small_dataset(data, tmp_path):
    updates = tiny_updates(data, tmp_path / "mini")
    del updates["datamodule"]["epoch_length"], updates["datamodule"]["sampler_replacement"]  # the recipe's 200 000 draws
    del updates["trainer"]["max_epochs"]
    run_ = run("main", ["maest_10s_random_weights_pretrain", "mini_train"], updates)  # 20 tracks: drawn with replacement
    assert run_.config["datamodule"]["epoch_length"] == 200_000 and run_.result["global_step"] == 2 * 5


def test_a_folder_on_a_file_system_without_locks_is_written_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from helpers.files import folder_lock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="helpers.files"):
        with folder_lock(tmp_path / "nfs", refuse_as="run_name") as folder:
            (folder / "written").write_text("x")
    assert (tmp_path / "nfs" / "written").read_text() == "x"
    assert f"cannot lock {tmp_path / 'nfs'} (No locks available): a second run into the same folder at the same time would not be noticed" in caplog.text


def test_the_run_seed_reaches_the_data_draws_and_crops(data, tmp_path, monkeypatch):
    """seed=N changed the weights' initialisation and augmentations but not which tracks were drawn or cropped."""
    import helpers.datamodule

    seen = []

    class Stop(Exception):
        pass

    def record(self, **options):
        seen.append(options["seed"])
        raise Stop

    monkeypatch.setattr(helpers.datamodule.MAESTDataModule, "__init__", record)
    for seed, data_seed in ((0, 0), (3, 0), (3, 2)):
        updates = tiny_updates(data, tmp_path / f"s{seed}-{data_seed}", max_epochs=1)
        updates["seed"] = seed
        updates["datamodule"]["seed"] = data_seed
        with pytest.raises(Stop):
            run("main", ["demo"], updates)
    assert seen == [0, 3, 5]  # datamodule.seed + seed: the demo (0 + 0) keeps its draws


def test_a_training_marks_the_records_of_killed_runs_of_its_folder_interrupted(data, tmp_path, caplog):
    """A SIGKILLed run's Sacred record says RUNNING for ever; the next training of the folder marks it INTERRUPTED."""
    import datetime
    import logging
    import shutil

    records = tmp_path / "records"
    updates = tiny_updates(data, tmp_path / "run", max_epochs=1)
    options = {"--loglevel": "ERROR", "--file_storage": str(records)}
    ex.run("main", named_configs=["demo"], config_updates=updates, options=options)
    # record 2: the same training, killed 10 minutes after its last heartbeat; record 3: alive, beating a second ago
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    for number, beat in ((2, now - datetime.timedelta(minutes=10)), (3, now - datetime.timedelta(seconds=1))):
        shutil.copytree(records / "1", records / str(number))
        entry = json.loads((records / str(number) / "run.json").read_text())
        entry.update(status="RUNNING", heartbeat=beat.isoformat(), stop_time=None)
        (records / str(number) / "run.json").write_text(json.dumps(entry))
    caplog.set_level(logging.WARNING, logger="ex_maest")
    ex.run("main", named_configs=["demo"], config_updates=updates, options=options)
    status = {n: json.loads((records / str(n) / "run.json").read_text())["status"] for n in (1, 2, 3, 4)}
    assert status == {1: "COMPLETED", 2: "INTERRUPTED", 3: "RUNNING", 4: "COMPLETED"}
    killed = json.loads((records / "2" / "run.json").read_text())
    assert killed["stop_time"] == (now - datetime.timedelta(minutes=10)).isoformat()
    assert killed["maest_stopped"].startswith("no heartbeat after ") and "killed without a word (SIGKILL" in killed["maest_stopped"]
    run_name = json.loads((records / "4" / "config.json").read_text())["run_name"]
    assert f"the Sacred record(s) {records / '2'} of run {run_name} still said RUNNING" in caplog.text
