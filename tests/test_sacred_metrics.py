"""Sacred run records: every epoch's metrics of ex_maest and ex_tl in metrics.json, the record kept by default, config files checked."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sacred import Experiment
from sacred.observers import FileStorageObserver

import ex_maest
import ex_tl
from configs.runs import SACRED_DIR_ENV, add_default_observer, check_config_files, check_config_keys
from helpers.melfiles import save_groundtruth
from helpers.metric_logger import ScalarCallbackLogger
from helpers.probe import embedding_path
from helpers.synthetic import make_synthetic_dataset
from models.mel import n_frames_for

CLIP = 1.0
ROOT = Path(__file__).resolve().parents[1]


def observed_run(experiment, tmp_path, **kwargs):
    """Run with a FileStorageObserver in tmp_path; returns (run, metrics.json as a dict)."""
    observer = FileStorageObserver(str(tmp_path / "sacred"))
    experiment.observers.append(observer)
    try:
        run = experiment.run(options={"--loglevel": "ERROR"}, **kwargs)
    finally:
        experiment.observers.remove(observer)
    return run, json.loads((tmp_path / "sacred" / str(run._id) / "metrics.json").read_text())


def test_logger_forwards_epoch_values_with_the_epoch_as_step_and_skips_step_values():
    logged = []
    logger = ScalarCallbackLogger(lambda name, value, step: logged.append((name, value, step)))
    logger.log_metrics({"train_loss_step": 0.9}, step=3)  # per step: TensorBoard only
    logger.log_metrics({"train_loss_epoch": 0.5, "train_loss_step": 0.4, "epoch": 2.0}, step=7)
    logger.log_metrics({"val_roc": float("nan"), "val_loss": 0.25, "epoch": 2}, step=7)  # NaN: not valid JSON, left out
    assert logged == [("train_loss_epoch", 0.5, 2), ("val_loss", 0.25, 2)]


def written_at_each_call(monkeypatch, module) -> list[dict]:
    """Spy on ``module.save_record_now``: metrics.json as it is on disk right after each call."""
    from configs.runs import save_record_now

    snapshots = []

    def spy(_run):
        save_record_now(_run)
        snapshots.append(json.loads((Path(_run.observers[0].dir) / "metrics.json").read_text()))

    monkeypatch.setattr(module, "save_record_now", spy)
    return snapshots


def test_an_epochs_metrics_are_written_when_logged_not_at_the_next_heartbeat(tmp_path):
    """Sacred writes metrics.json every 10 s: a run killed with SIGKILL lost its last epochs. save_record_now writes it now,
    one heartbeat at a time with Sacred's own thread."""
    from configs.runs import keep_output_of_failed_runs, save_record_now

    experiment = Experiment("x")
    keep_output_of_failed_runs(experiment)
    seen = {}

    @experiment.main
    def trains(_run):
        logger = ScalarCallbackLogger(_run.log_scalar, flush=lambda: save_record_now(_run))
        record = Path(_run.observers[0].dir) / "metrics.json"
        logger.log_metrics({"train_loss_epoch": 0.5, "epoch": 0})
        seen["after epoch 0"] = json.loads(record.read_text())
        logger.log_metrics({"train_loss_step": 0.4, "epoch": 1})  # nothing forwarded: nothing written
        seen["after a step"] = json.loads(record.read_text())
        seen["the thread beats the same way"] = _run._heartbeat.func is _run._emit_heartbeat

    observed_run(experiment, tmp_path)
    assert seen["after epoch 0"]["train_loss_epoch"]["values"] == [0.5]
    assert seen["after a step"] == seen["after epoch 0"]
    assert seen["the thread beats the same way"]


def test_training_metrics_json_holds_every_epoch(tmp_path, monkeypatch):
    snapshots = written_at_each_call(monkeypatch, ex_maest)
    data = make_synthetic_dataset(tmp_path / "data", n_tracks=30, clip_length=1.0)
    updates = {
        "synthetic_data": {"out_dir": None},
        "datamodule": {
            "base_dir": data["base_dir"], "groundtruth_train": data["groundtruth_train"], "groundtruth_val": data["groundtruth_val"],
            "clip_length": CLIP, "epoch_length": 8, "batch_size_train": 4, "batch_size_test": 8, "num_workers": 0,
            "sampler_replacement": True,
        },
        "maest": {"arch": "maest-tiny", "input_t": n_frames_for(CLIP), "s_patchout_t": 0, "s_patchout_f": 0},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "train"), "accelerator": "cpu", "precision": "32-true",
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    }

    run, metrics = observed_run(ex_maest.ex, tmp_path, config_updates=updates)

    assert run.status == "COMPLETED"
    for name in ("train_loss_epoch", "val_loss", "val_roc", "val_ap", "val_roc_swa", "val_n_classes_scored"):
        assert metrics[name]["steps"] == [0, 1], name  # one value per epoch, the 0-based epoch as the step
        assert all(np.isfinite(metrics[name]["values"])), name
    assert metrics["val_loss"]["values"][-1] == pytest.approx(run.result["metrics"]["val_loss"], rel=1e-6)
    assert 1 <= metrics["val_n_classes_scored"]["values"][0] <= 10
    assert not any(name.endswith("_step") for name in metrics)
    # epoch 0's values were on disk before epoch 1 ended (a kill then keeps them)
    assert any(snap.get("train_loss_epoch", {}).get("steps") == [0] and snap.get("val_loss", {}).get("steps") == [0] for snap in snapshots)


def probe_data(tmp_path) -> dict:
    """Embeddings of 3 classes, class 2 never present; the ex_tl config updates of a 3-epoch probe on them."""
    rng = np.random.default_rng(0)
    gts = {}
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        gt = {}
        for i in range(n):
            key = f"{split}-{i}.mmap"
            labels = np.array([i % 2 == 0, i % 2 == 1, False])  # class 2 never occurs: it cannot be scored
            clips = rng.normal(0, 0.1, size=(2, 3, 8)).astype(np.float32)
            clips[:, 0, :3] += np.where(labels, 1.0, -1.0)
            path = embedding_path(tmp_path / "emb", key)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, clips)
            gt[key] = labels
        gts[split] = str(save_groundtruth(tmp_path / f"gt-{split}.pk", gt))
    updates = {
        "embeddings_dir": str(tmp_path / "emb"), "groundtruth_train": gts["train"], "groundtruth_val": gts["validation"],
        "groundtruth_test": gts["test"], "out_dir": str(tmp_path / "probe"), "max_epochs": 3, "ramp_down_start": 2,
        "hidden_size": 8, "batch_size": 8, "lr": 1e-2,
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
    }
    return updates


def test_probe_metrics_json_and_results_count_the_scored_classes(tmp_path, monkeypatch):
    snapshots = written_at_each_call(monkeypatch, ex_tl)
    run, metrics = observed_run(ex_tl.ex, tmp_path, config_updates=probe_data(tmp_path))
    assert any(snap.get("val_roc_auc", {}).get("steps") == [0] for snap in snapshots)  # written as each epoch ended

    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["n_classes"] == 3
    assert results["val"]["n_classes_scored"] == 2 and results["test"]["n_classes_scored"] == 2
    assert metrics["val_roc_auc"]["steps"][:3] == [0, 1, 2] and metrics["train_loss"]["steps"] == [0, 1, 2]
    assert metrics["val_n_classes_scored"]["values"][0] == 2


def test_both_programs_keep_a_run_record_by_default(tmp_path):
    """`python ex_tl.py with ...` (as `ex_maest.py`) writes outputs/sacred/<id> without -F ($MAEST_SACRED_DIR here)."""
    updates = probe_data(tmp_path)
    args = [f"{key}={value}" for key, value in updates.items() if key != "trainer"]
    args += ["trainer.accelerator=cpu", "trainer.enable_progress_bar=False", "trainer.enable_model_summary=False"]
    env = {**os.environ, SACRED_DIR_ENV: str(tmp_path / "records"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "ex_tl.py"), "with", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-2000:]
    record = tmp_path / "records" / "1"
    assert json.loads((record / "run.json").read_text())["status"] == "COMPLETED"
    assert json.loads((record / "config.json").read_text())["max_epochs"] == 3
    assert json.loads((record / "metrics.json").read_text())["val_roc_auc"]["steps"][:3] == [0, 1, 2]


@pytest.mark.parametrize("argv, environ, expected", [
    (["ex_tl.py", "with", "demo"], {}, "outputs/sacred"),
    (["ex_maest.py", "extract_embeddings", "with", "demo"], {SACRED_DIR_ENV: "/r"}, "/r"),
    (["ex_maest.py", "with", "demo", "-F", "mine"], {}, None),  # the command line's own observer
    (["ex_maest.py", "with", "demo", "--file_storage=mine"], {}, None),
    (["ex_maest.py", "-u", "with", "demo"], {}, None),  # unobserved
    (["ex_maest.py", "print_config", "with", "demo"], {}, None),  # shows, runs nothing
    (["ex_maest.py", "with", "demo"], {"LOCAL_RANK": "1"}, None),  # a DDP rank besides the first
    (["ex_maest.py", "with", "demo"], {"SLURM_PROCID": "3"}, None),
])
def test_default_observer_only_where_nothing_else_is_asked(argv, environ, expected):
    experiment = Experiment("x")
    folder = add_default_observer(experiment, argv, environ)
    assert (str(folder) if folder else None) == expected
    assert [o.basedir for o in experiment.observers] == ([expected] if expected else [])


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyboardInterrupt()])
def test_a_failed_run_keeps_its_output_in_the_record(error, tmp_path):
    """Sacred saves the captured output at heartbeats and on success only: a short failed run's cout.txt was empty."""
    from sacred.observers import FileStorageObserver

    from configs.runs import keep_output_of_failed_runs

    experiment = Experiment("x")
    keep_output_of_failed_runs(experiment)
    experiment.observers.append(FileStorageObserver(str(tmp_path / "records")))

    @experiment.main
    def fails():
        print("FAILED a.mmap: the reason")
        raise error

    with pytest.raises(type(error)):
        experiment.run(options={"--capture": "sys"})
    record = tmp_path / "records" / "1"
    assert "FAILED a.mmap: the reason" in (record / "cout.txt").read_text()
    assert json.loads((record / "run.json").read_text())["status"] == ("FAILED" if isinstance(error, ValueError) else "INTERRUPTED")


def test_other_ranks_drop_the_command_lines_observer():
    """A DDP rank besides the first runs the command line again: without -F/-m, so one run keeps one record."""
    argv = ["ex_maest.py", "-F", "mine", "extract_logits", "--mongo_db=db:1", "with", "demo", "x=-F", "-m", "host:27017"]
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.INFO)
    try:
        assert add_default_observer(Experiment("x"), argv, {"LOCAL_RANK": "1"}) is None
        assert root.level == logging.WARNING  # the other ranks' INFO lines would repeat rank 0's
    finally:
        root.setLevel(level)
    assert argv == ["ex_maest.py", "extract_logits", "with", "demo", "x=-F"]
    argv = ["ex_maest.py", "-F", "mine", "with", "demo"]
    add_default_observer(Experiment("x"), argv, {})  # rank 0 keeps it
    assert argv == ["ex_maest.py", "-F", "mine", "with", "demo"]


def test_a_missing_config_file_after_with_is_named_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")
    check_config_files(["ex_maest.py", "with", "demo", "dataset.json", "seed=1", "x.json=2"])  # exists; keys are not files
    with pytest.raises(SystemExit, match=r"config file nonexist/dataset.json does not exist .*prepare_folder"):
        check_config_files(["ex_maest.py", "predict", "with", "demo", "nonexist/dataset.json"])
    done = subprocess.run([sys.executable, str(ROOT / "ex_tl.py"), "with", "demo", "typo/dataset.json"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "config file typo/dataset.json does not exist" in done.stderr
    assert "pkg_resources" not in done.stderr  # sacred's import warning is not shown on every run


def test_a_mistyped_key_is_named_with_the_keys_it_resembles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["ex_maest.py", "with", "demo", "datamodule.batch_size_train=3", "trainer.max_epochs=2"],
                 ["ex_maest.py", "predict", "with", "demo", "predict.top_k=2", "-F", "records"],
                 ["ex_maest.py", "print_config"], ["ex_maest.py", "with", "demo"], ["ex_maest.py", "with", "demo", "trainer.limit_train_batches=5"]):
        check_config_keys(ex_maest.ex, argv)  # every key exists: nothing to say
    check_config_keys(ex_tl.ex, ["ex_tl.py", "with", "demo", "probe_search", "search_grid.wd=[0.1]"])  # inside a dict entry: Sacred accepts it

    with pytest.raises(SystemExit) as err:
        check_config_keys(ex_maest.ex, ["ex_maest.py", "extract_embeddings", "with", "demo", "predict.transformer_blok=2",
                                        "batch_size_train=3", "trainer.max_epochs=2", "trainer.limit_train_batches=5", "-F", "records"])
    message = str(err.value)
    assert "unknown config keys after `with`:" in message
    assert "limit_train_batches" not in message  # any Lightning Trainer argument is a trainer key (SPEC §4)
    assert "predict.transformer_blok=2: no such config key; did you mean predict.transformer_block?" in message
    assert "batch_size_train=3: no such config key; did you mean datamodule.batch_size_train?" in message
    assert "max_epochs" not in message  # a key that exists is not listed
    assert message.endswith("`python ex_maest.py print_config with demo` lists every key with its comment")

    done = subprocess.run([sys.executable, str(ROOT / "ex_maest.py"), "with", "demo", "datamodule.batch_sise_train=3"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "datamodule.batch_sise_train=3: no such config key; did you mean datamodule.batch_size_train" in done.stderr
    assert not (tmp_path / "outputs").exists()  # refused before any run record or data
    assert "pkg_resources" not in done.stderr


@pytest.mark.parametrize("program, argv, expected", [
    (ex_tl, ["ex_tl.py", "with", "demo"], ex_tl.RESUME_HINT),
    (ex_maest, ["ex_maest.py", "with", "demo"], "training keeps its checkpoints; rerun the same command with ckpt_path=last"),
    (ex_maest, ["ex_maest.py", "extract_logits", "with", "demo"], "every file written so far is kept; rerun the same command"),
    (ex_maest, ["ex_maest.py", "predict", "with", "demo"], "predict writes its output once every file is labelled, so nothing was written"),
    (ex_maest, ["ex_maest.py", "export_onnx", "with", "demo"], "nothing is left half-written"),
])
def test_ctrl_c_ends_in_one_line_saying_how_to_go_on(program, argv, expected, monkeypatch, capsys):
    from configs.runs import run_commandline

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(program.ex, "run_commandline", interrupted)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        run_commandline(program.ex, program.RESUME_HINT)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"interrupted (Ctrl-C): {expected}") and "rerun the same command" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("program", [ex_maest, ex_tl])
def test_a_command_line_that_does_not_parse_says_where_named_configs_go(program, monkeypatch, capsys):
    from configs.runs import run_commandline

    name = "ex_maest.py" if program is ex_maest else "ex_tl.py"
    monkeypatch.setattr(sys, "argv", [name, "print_config", "demo"])  # `with` left out
    with pytest.raises(SystemExit) as exit_info:
        run_commandline(program.ex, program.RESUME_HINT)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{name}: this command line does not parse: 'print_config demo'" in err
    assert "named configs and key=value updates go after `with`" in err and "dummy" not in err

    monkeypatch.setattr(sys, "argv", [name, "demo", "with", "seed=1"])  # a named config as the command
    with pytest.raises(SystemExit) as exit_info:
        run_commandline(program.ex, program.RESUME_HINT)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{name}: 'demo' is a named config, not a command. It reads" in err and "not found" not in err


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from configs.runs import ctrl_c_from_lightning, run_commandline

    def stopped(fn: str, every_n_train_steps: int = 0):
        callback = SimpleNamespace(dirpath=str(tmp_path), _every_n_train_steps=every_n_train_steps)
        trainer = SimpleNamespace(interrupted=True, state=SimpleNamespace(fn=fn), checkpoint_callback=callback, checkpoint_callbacks=[callback])
        with pytest.raises(KeyboardInterrupt) as interrupt, ctrl_c_from_lightning(trainer):
            raise SystemExit(1)  # what Lightning does after its graceful shutdown
        return str(interrupt.value)

    assert "nothing to resume; rerun the same command (without ckpt_path=last)" in stopped("fit")
    assert stopped("test") == ""  # testing resumes nothing: the command's own line
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert stopped("fit") == ""  # a checkpoint: "rerun with ckpt_path=last", and the tip of checkpoint_every_n_train_steps
    assert "checkpoint_every_n_train_steps" in ex_maest.RESUME_HINT["main"]
    # already saving within epochs: the line without that tip
    assert stopped("fit", every_n_train_steps=20) == "training keeps its checkpoints; rerun the same command with ckpt_path=last to go on."

    def interrupted():
        raise KeyboardInterrupt("training stopped before its first checkpoint, so there is nothing to resume")

    monkeypatch.setattr(ex_maest.ex, "run_commandline", interrupted)
    monkeypatch.setattr(sys, "argv", ["ex_maest.py", "with", "demo"])
    with pytest.raises(SystemExit):
        run_commandline(ex_maest.ex, ex_maest.RESUME_HINT)
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C): training stopped before its first checkpoint" in err and "ckpt_path=last to go on" not in err


def test_ctrl_c_line_is_printed_by_the_first_process_of_the_node_only(monkeypatch, capsys):
    """Ctrl-C reaches every process of a multi-process run; the processes the launcher started exit 130 quietly."""
    from configs.runs import run_commandline

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ex_maest.ex, "run_commandline", interrupted)
    monkeypatch.setattr(sys, "argv", ["ex_maest.py", "extract_logits", "with", "demo"])
    for environ, printed in (({"LOCAL_RANK": "1"}, False), ({"SLURM_LOCALID": "3"}, False), ({"LOCAL_RANK": "0"}, True), ({}, True)):
        for name in ("LOCAL_RANK", "SLURM_LOCALID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exit_info:
            run_commandline(ex_maest.ex, ex_maest.RESUME_HINT)
        assert exit_info.value.code == 130
        assert ("interrupted (Ctrl-C)" in capsys.readouterr().err) == printed, environ


def _raises_for_the_user():
    raise ValueError("a message written for the user")


def _fails_in_an_expression():
    return {}["missing"]


def _fails_in_a_library():
    return json.loads("{not json")


def _caught(function) -> BaseException:
    try:
        function()
    except Exception as e:  # noqa: BLE001 - the exception itself is what is checked
        return e
    raise AssertionError(f"{function.__name__} did not raise")


def test_only_errors_raised_by_this_project_for_the_user_lose_their_traceback():
    from configs.runs import raised_for_the_user

    assert raised_for_the_user(_caught(_raises_for_the_user))
    assert not raised_for_the_user(_caught(_fails_in_an_expression))  # a bug: the traceback is what a report needs
    assert not raised_for_the_user(_caught(_fails_in_a_library))
    assert not raised_for_the_user(ValueError("never raised"))


def test_a_clear_error_prints_its_message_alone_and_the_record_keeps_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), SACRED_DIR_ENV: str(tmp_path / "records")}
    command = [sys.executable, str(ROOT / "ex_maest.py"), "test", "with", "demo", "inference_checkpoint=missing.ckpt"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "FileNotFoundError: checkpoint missing.ckpt does not exist\n(add -d to the command for the traceback)" in done.stderr
    assert "Traceback" not in done.stderr
    record = json.loads((tmp_path / "records" / "1" / "run.json").read_text())
    assert record["status"] == "FAILED" and "raise missing_checkpoint_error(path)" in "".join(record["fail_trace"])

    debug = subprocess.run([*command, "-d"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr  # -d: the whole traceback


def test_a_long_result_line_is_shortened_in_the_log_only(caplog):
    result = [{"file": f"track_{i}.wav", "labels": ["rock"]} for i in range(400)]
    logger = logging.getLogger(ex_maest.ex.path)  # the one Sacred writes its run lines with
    with caplog.at_level(logging.INFO, logger=ex_maest.ex.path):
        logger.info("Result: {}".format(result))
        logger.info("Result: {}".format(result[:2]))
    long, short = (r.getMessage() for r in caplog.records[-2:])
    assert long.startswith("Result: [{'file': 'track_0.wav'") and len(long) < 1100
    assert long.endswith(f"... ({len('Result: ' + str(result))} characters; the run record has them all)")
    assert short == "Result: {}".format(result[:2])  # short results are left whole


def _passes_on_a_library_error():
    try:
        json.loads("{not json")
    except ValueError as e:
        raise e


def _raises_from_a_helper():
    raise error_for_the_user("made by a helper")


def error_for_the_user(message):
    return ValueError(message)


def test_a_passed_on_exception_keeps_its_traceback_and_one_a_helper_made_does_not():
    from configs.runs import raised_for_the_user

    assert not raised_for_the_user(_caught(_passes_on_a_library_error))
    assert raised_for_the_user(_caught(_raises_from_a_helper))  # `raise error_for_the_user(...)`: a new exception


def test_config_differences_name_the_keys_that_name_runs_apart():
    from configs.runs import config_differences

    here = {"seed": 1, "trainer": {"devices": 2, "default_root_dir": "a"}, "run_name": "x", "datamodule": {"num_workers": 8}}
    there = {"seed": 1, "trainer": {"devices": 4, "default_root_dir": "b"}, "run_name": "y", "module": {"lr": 0.1}}
    # output folders, the run's name and the worker count do not name runs apart (RUN_NAME_IGNORES)
    assert config_differences(here, there) == "module.lr 0.1 there, (not set) here; trainer.devices 4 there, 2 here"
    many = {f"k{i}": i for i in range(6)}
    assert config_differences(many, {}, shown=2) == "k0 (not set) there, 0 here; k1 (not set) there, 1 here; and 4 more"


def test_ex_maest_starts_without_importing_lightning_and_still_takes_every_trainer_argument():
    """Lightning takes seconds to import: commands that never train (print_config, predict, export) start
    without it. The Trainer's arguments, which the trainer ingredient accepts as keys, are read from its source."""
    import inspect

    import lightning.pytorch as pl

    from configs.ingredients.trainer import _lightning_trainer_arguments

    assert _lightning_trainer_arguments() == tuple(name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self")
    code = "import sys, ex_maest; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    # predict, to its first error (its config checked, no trainer.<key> checked against Lightning's annotations)
    code = textwrap.dedent("""
        import runpy, sys
        sys.argv = ["ex_maest.py", "predict", "-u", "with", "demo", "predict.audio=['/nonexistent.wav']"]
        try:
            runpy.run_path("ex_maest.py", run_name="__main__")
        except SystemExit:
            pass
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics')))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "inference_checkpoint='last'" in out.stderr and out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_ex_tl_starts_without_importing_lightning_until_it_trains():
    """`ex_tl.py print_config` and its config errors start without Lightning; helpers.probe still gives its classes."""
    code = textwrap.dedent("""
        import runpy, sys
        sys.argv = ["ex_tl.py", "print_config", "with", "demo"]
        runpy.run_path("ex_tl.py", run_name="__main__")
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics')))
        import helpers.probe, helpers.probe_lightning
        print(helpers.probe.ProbeModule is helpers.probe_lightning.ProbeModule, helpers.probe.EmbeddingDataModule.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "embeddings_dir" in out.stdout  # the config was printed
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "True helpers.probe_lightning"]


def test_only_the_stale_running_records_of_the_same_training_are_marked_killed(tmp_path):
    import datetime

    from configs.runs import KILLED_AFTER_S, mark_killed_records

    now = datetime.datetime(2026, 11, 22, 12, 0, 0)
    stale, fresh = now - datetime.timedelta(seconds=KILLED_AFTER_S + 1), now - datetime.timedelta(seconds=30)
    cases = {  # number: (status, command, experiment, run_name, heartbeat)
        1: ("RUNNING", "main", "maest", "r", stale),  # killed: marked
        2: ("RUNNING", "main", "maest", "r", fresh),  # alive
        3: ("COMPLETED", "main", "maest", "r", stale),
        4: ("RUNNING", "main", "maest", "other", stale),  # another run
        5: ("RUNNING", "main", "maest_tl", "r", stale),  # another program
        6: ("RUNNING", "test", "maest", "r", stale),  # another command of the run (it may run beside a training)
        7: ("RUNNING", "main", "maest", "r", stale),  # the caller's own record
        8: ("RUNNING", "main", "maest", "r", None),  # no heartbeat yet: its start time counts
    }
    for number, (status, command, experiment, run_name, beat) in cases.items():
        folder = tmp_path / str(number)
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps({"status": status, "command": command, "experiment": {"name": experiment},
                                                     "heartbeat": beat and beat.isoformat(), "start_time": stale.isoformat()}))
        (folder / "config.json").write_text(json.dumps({"run_name": run_name}))
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "run.json").write_text("{not json")  # a broken record is passed over
    marked = mark_killed_records("r", "maest", "main", record_dirs=[tmp_path, str(tmp_path)], exclude=[tmp_path / "7"], now=now)
    assert marked == [tmp_path / "1", tmp_path / "8"]
    statuses = {n: json.loads((tmp_path / str(n) / "run.json").read_text())["status"] for n in cases}
    assert statuses == {1: "INTERRUPTED", 2: "RUNNING", 3: "COMPLETED", 4: "RUNNING", 5: "RUNNING", 6: "RUNNING", 7: "RUNNING", 8: "INTERRUPTED"}
    assert json.loads((tmp_path / "1" / "run.json").read_text())["stop_time"] == stale.isoformat()
