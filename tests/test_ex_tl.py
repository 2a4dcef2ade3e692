"""ex_tl.py end to end: Sacred run on synthetic separable embeddings, results.json, errors, named configs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ex_tl import ex
from helpers.melfiles import load_groundtruth, save_groundtruth
from helpers.probe import MissingEmbeddingsError, embedding_path

N_CLASSES = 3
TOKEN_SIZE = 8


def write_split(root, split, n_tracks, rng):
    """Multi-hot labels; the CLS token of every clip carries them (+1/-1 per class), DIST and mean-token are noise."""
    gt = {}
    for i in range(n_tracks):
        key = f"{i % 4}/{split}-track-{i}.mmap"  # nested like the MTT keys
        labels = rng.random(N_CLASSES) < 0.5
        labels[i % N_CLASSES] = True  # every class occurs in every split
        labels[(i + 1) % N_CLASSES] = False  # ... and is absent somewhere
        clips = rng.normal(0.0, 0.2, size=(1 + i % 3, 3, TOKEN_SIZE)).astype(np.float32)
        clips[:, 0, :N_CLASSES] += np.where(labels, 1.0, -1.0)
        path = embedding_path(root / "embeddings", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, clips)
        gt[key] = labels
    return str(save_groundtruth(root / "data" / f"groundtruth-{split}.pk", gt))


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [("train", 48), ("validation", 16), ("test", 16)]
    gts = {split: write_split(tmp_path, split, n, rng) for split, n in sizes}
    return {
        "embeddings_dir": str(tmp_path / "embeddings"),
        "groundtruth_train": gts["train"],
        "groundtruth_val": gts["validation"],
        "groundtruth_test": gts["test"],
        "out_dir": str(tmp_path / "probe"),
    }


FAST = {
    "max_epochs": 8,
    "ramp_down_start": 4,
    "lr": 1e-2,
    "hidden_size": 16,
    "dropout": 0.0,
    "batch_size": 16,
    "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
}


def run(named_configs, updates, command="main"):
    return ex.run(command, named_configs=named_configs, config_updates=updates, options={"--loglevel": "ERROR"})


def test_demo_config_probes_and_writes_results(dataset, tmp_path):
    r = run(["demo"], {**dataset, **FAST})

    assert r.status == "COMPLETED"
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results == json.loads(json.dumps(r.result, default=str))
    assert results["test"]["roc_auc"] > 0.95 and results["val"]["roc_auc"] > 0.95
    assert 0.0 < results["test"]["pr_auc"] <= 1.0 and 0.0 < results["val"]["pr_auc"] <= 1.0
    assert results["n_tracks"] == {"train": 48, "val": 16, "test": 16}
    assert results["input_dim"] == 3 * TOKEN_SIZE  # demo: token "cdt", concatenated
    assert results["n_classes"] == N_CLASSES
    assert results["config"]["token"] == "cdt" and results["config"]["max_epochs"] == 8
    assert (tmp_path / "probe" / "checkpoints" / "best.ckpt").is_file()
    assert results["checkpoint"].endswith("best.ckpt")


def test_a_probe_into_the_folder_of_a_probe_of_other_embeddings_says_it_replaces_it(dataset, tmp_path, caplog):
    import shutil

    run(["demo"], {**dataset, **FAST, "max_epochs": 2, "ramp_down_start": 1})
    other = tmp_path / "embeddings-copy"
    shutil.copytree(dataset["embeddings_dir"], other)
    with caplog.at_level("WARNING", logger="ex_tl"):
        run(["demo"], {**dataset, **FAST, "max_epochs": 2, "ramp_down_start": 1, "embeddings_dir": str(other)})
    assert (f"{tmp_path / 'probe'} holds the results of a probe of {dataset['embeddings_dir']}: this run, on {other}, replaces "
            "them and the checkpoint (set out_dir to keep both)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ex_tl"):
        run(["demo"], {**dataset, **FAST, "max_epochs": 2, "ramp_down_start": 1, "embeddings_dir": str(other)})  # a rerun on the same embeddings
    assert "holds the results of a probe of" not in caplog.text


def test_linear_probe_on_one_token(dataset, tmp_path):
    linear = {"token": "c", "combine": "mean", "hidden_size": 0, "lr": 0.1, "warm_up_len": 0, "ramp_down_start": 1}
    r = run([], {**dataset, **FAST, **linear})

    assert r.result["input_dim"] == TOKEN_SIZE
    assert r.result["test"]["roc_auc"] > 0.95
    assert r.result["config"]["ramp_down_len"] == 7  # derived: max_epochs - ramp_down_start


def test_missing_embeddings_say_how_to_make_them(dataset, tmp_path):
    next((tmp_path / "embeddings").rglob("test-track-5.mmap.embeddings.npy")).unlink()

    with pytest.raises(MissingEmbeddingsError, match=r"1 of 80 embedding files are missing(.|\n)*test-track-5\.mmap"
                       r"(.|\n)*python ex_maest\.py extract_embeddings with"):
        run(["demo"], {**dataset, **FAST})
    assert not (tmp_path / "probe" / "results.json").exists()


def test_unset_paths_are_reported():
    unset = r"embeddings_dir, groundtruth_train, groundtruth_val, groundtruth_test not set"
    with pytest.raises(ValueError, match=unset):
        run([], FAST)


def test_ramp_down_after_the_last_epoch_is_refused(dataset):
    with pytest.raises(ValueError, match=r"ramp_down_len=-6 must be > 0 .*max_epochs - ramp_down_start"):
        run(["demo"], {**dataset, "max_epochs": 4, "ramp_down_start": 10})


def test_short_runs_ramp_down_in_their_last_epoch(dataset):
    config = run(["demo"], {**dataset, "max_epochs": 4}, command="print_config").config
    assert (config["ramp_down_start"], config["ramp_down_len"]) == (3, 1)  # 10 from 11 epochs on
    config = run(["target_mtt_tl"], {}, command="print_config").config
    assert (config["max_epochs"], config["ramp_down_start"], config["ramp_down_len"]) == (30, 10, 20)  # the paper's schedule


def test_trainer_max_epochs_is_refused(dataset):
    with pytest.raises(ValueError, match=r"use `max_epochs=\.\.\.`, not `trainer\.max_epochs=\.\.\.`"):
        run([], {**dataset, "trainer": {"max_epochs": 3}})


def test_named_configs_point_at_their_data():
    mtt = run(["target_mtt_tl"], {}, command="print_config").config
    assert mtt["embeddings_dir"] == "outputs/mtt/embeddings" and mtt["out_dir"] == "outputs/mtt/probe"
    assert mtt["max_epochs"] == 30 and mtt["hidden_size"] == 512
    for key in ("groundtruth_train", "groundtruth_val", "groundtruth_test"):
        gt = load_groundtruth(mtt[key])  # shipped with the repository
        assert len(next(iter(gt.values()))) == 50

    demo = run(["demo"], {}, command="print_config").config
    assert demo["embeddings_dir"] == "outputs/demo/embeddings"
    assert demo["groundtruth_val"] == "outputs/demo/data/groundtruth-validation.pk"
    assert demo["trainer"]["accelerator"] == "cpu"
    assert ex.named_configs["demo"].__doc__ and ex.named_configs["target_mtt_tl"].__doc__

    # GTZAN: the probe reads what `ex_maest.py extract_embeddings with target_gtzan` writes, as multiclass
    import ex_maest

    gtzan = run(["target_gtzan_tl"], {}, command="print_config").config
    extraction = ex_maest.ex.named_configs["target_gtzan"]()
    assert gtzan["task"] == "multiclass" and gtzan["embeddings_dir"] == extraction["predict"]["out_dir"]
    assert gtzan["groundtruth_test"].startswith(extraction["datamodule"]["base_dir"])


def test_probe_results_go_beside_the_embeddings_by_default():
    from ex_tl import ex

    run = ex.run("print_config", config_updates={"embeddings_dir": "outputs/my_run/embeddings"}, options={"--loglevel": "ERROR"})
    assert run.config["out_dir"] == os.path.join("outputs", "my_run", "probe")
    run = ex.run("print_config", config_updates={"embeddings_dir": "e", "out_dir": "elsewhere"}, options={"--loglevel": "ERROR"})
    assert run.config["out_dir"] == "elsewhere"
    # embedding folders side by side (not a run's embeddings/): their probes stay apart
    for folder in ("/data/emb_block6", "/data/emb_all/"):
        run = ex.run("print_config", config_updates={"embeddings_dir": folder}, options={"--loglevel": "ERROR"})
        assert run.config["out_dir"] == os.path.join("/data", f"probe-{os.path.basename(os.path.normpath(folder))}")


# ---- search, layers and tasks ----------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEARCH = {
    "search_grid": {"lr": [1e-3, 1e-2], "hidden_layers": [0, 1], "hidden_size": [16], "dropout": [0.1]},
    "search_seeds": 2,
    "max_epochs": 4,
    "ramp_down_start": 2,
}


def test_probe_search_writes_every_trial_mean_std_and_plot_deterministically_and_resumes(dataset, tmp_path):
    r = run(["demo", "probe_search"], {**dataset, **SEARCH})

    out = tmp_path / "probe"
    results = json.loads((out / "results.json").read_text())
    assert r.result == {**{k: results[k] for k in ("task", "selection_metric", "best", "val", "test", "plot")},
                        "results": str(out / "results.json")}  # the outcome; the trials are in the file
    assert results["config"]["search"] is True and results["selection_metric"] == "roc_auc"
    trials = results["trials"]
    assert [t["setting"] for t in trials] == [
        {"lr": lr, "hidden_layers": h, "hidden_size": 16, "dropout": 0.1} for lr in (1e-3, 1e-2) for h in (0, 1)
    ]
    for t in trials:
        assert t["epochs"] == 4 and 0 <= t["best_epoch"] < 4 and t["seconds"] >= 0
        assert set(t["val"]) == {"roc_auc", "pr_auc", "n_classes_scored"} and t["score"] == t["val"]["roc_auc"]
    best = max(range(4), key=lambda i: (trials[i]["score"], -i))
    assert results["best"]["trial"] == best and results["best"]["setting"] == trials[best]["setting"]
    assert [s["seed"] for s in results["seeds"]] == [42, 43]
    for metric in ("roc_auc", "pr_auc"):
        values = [s["test"][metric] for s in results["seeds"]]
        summary = results["test"][metric]
        assert summary["values"] == values and summary["mean"] == pytest.approx(np.mean(values))
        assert summary["std"] == pytest.approx(np.std(values, ddof=1))  # the sample standard deviation
    assert results["test"]["roc_auc"]["mean"] > 0.9
    png = (out / "search.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000 and results["plot"] == str(out / "search.png")
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4 + 2

    def comparable(res):  # everything but the wall-clock times and the resume flags
        drop = {"seconds", "resumed"}
        return [{k: v for k, v in e.items() if k not in drop} for e in res["trials"] + res["seeds"]], res["test"]

    run(["demo", "probe_search"], {**dataset, **SEARCH, "out_dir": str(tmp_path / "other")})
    again = json.loads((tmp_path / "other" / "results.json").read_text())
    assert comparable(again) == comparable(results)  # same config, fresh folder: the same numbers

    run(["demo", "probe_search"], {**dataset, **SEARCH})  # same folder: nothing trained again
    resumed = json.loads((out / "results.json").read_text())
    assert all(t.get("resumed", True) for t in resumed["trials"]) and all(s["resumed"] for s in resumed["seeds"])
    assert comparable(resumed) == comparable(results)


def test_a_search_and_a_single_probe_in_one_folder_say_whose_files_are_whose(dataset, tmp_path, caplog):
    out = tmp_path / "probe"
    run(["demo"], {**dataset, **FAST})
    with caplog.at_level("WARNING", logger="ex_tl"):
        run(["demo", "probe_search"], {**dataset, **SEARCH, "search_grid": {"lr": [1e-2]}, "search_seeds": 1})
    assert f"{out}: checkpoints/best.ckpt from an earlier single probe stay as they were; results.json now describes this search" in caplog.text
    assert (out / "checkpoints" / "best.ckpt").is_file() and json.loads((out / "results.json").read_text())["config"]["search"] is True
    caplog.clear()
    with caplog.at_level("WARNING", logger="ex_tl"):
        run(["demo"], {**dataset, **FAST})
    assert "trials.jsonl and search.png from an earlier probe search stay as they were; results.json now describes this single probe" in caplog.text


def write_task_split(root, split, n_tracks, rng, task):
    """(n_clips, 2 blocks, 3, D) files of blocks [1, 3]; only block 3's CLS token carries the target."""
    gt = {}
    for i in range(n_tracks):
        key = f"{split}/{i}.mmap"
        clips = rng.normal(0.0, 1.0, size=(1 + i % 2, 2, 3, TOKEN_SIZE)).astype(np.float32)
        if task == "multiclass":
            clips[:, 1, 0, i % N_CLASSES] += 2.5
            gt[key] = np.eye(N_CLASSES, dtype=bool)[i % N_CLASSES]  # one-hot, as GTZAN's ground truth
        else:
            gt[key] = np.array([50.0 + 10.0 * clips[:, 1, 0, 0].mean()])
        path = embedding_path(root / "embeddings", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, clips)
    (root / "embeddings" / "config.json").write_text(json.dumps({"blocks": [1, 3], "n_frames": 312}))
    return str(save_groundtruth(root / "data" / f"groundtruth-{split}.pk", gt))


def task_dataset(tmp_path, task):
    rng = np.random.default_rng(1)
    gts = {split: write_task_split(tmp_path, split, n, rng, task) for split, n in [("train", 60), ("val", 24), ("test", 24)]}
    return {
        "embeddings_dir": str(tmp_path / "embeddings"), "groundtruth_train": gts["train"],
        "groundtruth_val": gts["val"], "groundtruth_test": gts["test"], "out_dir": str(tmp_path / "probe"), "task": task,
    }


def test_multiclass_probe_with_weighted_blocks_reports_accuracy_and_the_weights(tmp_path):
    updates = {**task_dataset(tmp_path, "multiclass"), **FAST, "token": "c", "layers": "all", "layer_combine": "weighted",
               "hidden_size": 0, "lr": 5e-2, "warm_up_len": 0}

    results = run([], updates).result

    assert results["task"] == "multiclass" and results["selection_metric"] == "accuracy"  # the multiclass default
    assert set(results["test"]) == {"accuracy", "roc_auc", "pr_auc", "n_classes_scored"}
    assert results["test"]["accuracy"] > 0.8 and results["n_classes"] == N_CLASSES, results["test"]  # chance: 1/3
    assert results["blocks"] == [1, 3] and results["input_dim"] == TOKEN_SIZE
    weights = results["layer_weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0, abs=1e-5) and weights[1] > weights[0], weights

    single = run([], {**updates, "layers": [3], "layer_combine": "single", "selection_metric": "accuracy",
                      "out_dir": str(tmp_path / "single")}).result
    assert single["blocks"] == [3] and "layer_weights" not in single and single["test"]["accuracy"] > 0.8
    with pytest.raises(ValueError, match=r"layers=\[2\]: block\(s\) \[2\] not in the embeddings under .*lists blocks \[1, 3\]"):
        run([], {**updates, "layers": [2]})


def test_regression_search_selects_on_r2(tmp_path):
    updates = {**task_dataset(tmp_path, "regression"), **SEARCH, "token": "c", "layers": [3],
               "search_grid": {"lr": [3e-2, 1e-1], "hidden_layers": [0], "hidden_size": [16], "dropout": [0.1]},
               "max_epochs": 12, "ramp_down_start": 8, "warm_up_len": 0}

    run(["probe_search"], updates)

    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["task"] == "regression" and results["selection_metric"] == "r2" and "best" in results
    assert set(results["test"]) == {"r2", "mse"} and set(results["seeds"][0]["test"]) == {"r2", "mse"}
    assert results["test"]["r2"]["mean"] > 0.8
    assert results["trials"][0]["score"] == results["trials"][0]["val"]["r2"]


# ---- config checks before any work, unscorable validation, failed extractions ----------------


@pytest.mark.parametrize(
    "updates, named, match",
    [
        ({"lr": "abc"}, [], r"lr must be a number, > 0, got 'abc'"),
        ({"lr": "abc", "hidden_layers": -1}, [], r"hidden_layers must be an integer, >= 0.*\n.*lr must be a number"),
        ({"max_epochs": "abc"}, [], r"max_epochs must be an integer, >= 1, got 'abc'"),  # the derived defaults do not crash first
        ({"dropout": 1.5, "threads": 0}, [], r"dropout must be a number, in \[0, 1\), got 1\.5(.|\n)*threads must be"),
        ({"layers": "first", "task": "ranking", "token": "x"}, [], r"token='x': use(.|\n)*layers='first': use None or 'all'"
                                                                   r"(.|\n)*task must be one of"),
        ({"selection_metric": "r2"}, [], r"selection_metric='r2': task='multilabel' reports"),
        ({"search_grid": {"lr": ["a"]}}, ["probe_search"], r"search_grid\.lr=\['a'\]: each value must be a number > 0"),
        ({"search_grid": {"lr": [0]}}, ["probe_search"], r"search_grid\.lr=\[0\]: each value must be a number > 0, not 0"),
        ({"search_grid": {"lrs": [1e-3]}}, ["probe_search"], r"search_grid\.lrs: .*did you mean search_grid\.lr\?"),
        ({"search_grid": {"dropout": 0.1}}, ["probe_search"], r"search_grid\.dropout=0\.1: give a non-empty list of values"),
        ({"search_seeds": 0}, ["probe_search"], r"search_seeds must be an integer, >= 1, got 0"),
    ],
)
def test_config_values_are_refused_before_any_embedding_is_read(tmp_path, updates, named, match):
    never_read = {"embeddings_dir": str(tmp_path / "nowhere"), "groundtruth_train": "no.pk", "groundtruth_val": "no.pk",
                  "groundtruth_test": "no.pk"}  # loading would fail on these: the config is refused first
    with pytest.raises(ValueError, match=r"invalid configuration; fix these keys(.|\n)*" + match):
        run(named, {**never_read, **updates})


def test_every_config_comment_is_one_line_so_print_config_shows_it_whole():
    import inspect

    import ex_tl

    lines = inspect.getsource(ex_tl.default_config._func).splitlines()  # the config scope's function
    for i, line in enumerate(lines[2:], start=2):
        if line.strip().startswith("#") and lines[i - 1].strip().startswith("#"):
            pytest.fail(f"two comment lines before a config entry (print_config shows only the last): {line.strip()}")
    docs = ex.configurations[0]._var_docs
    assert docs["task"].startswith('"multilabel"') and "regression" in docs["task"]
    assert docs["layer_combine"].startswith("how the chosen blocks") and "weighted" in docs["layer_combine"]


def test_a_validation_split_that_cannot_score_is_refused_before_training(dataset, tmp_path):
    one_track = save_groundtruth(tmp_path / "one-val.pk", dict(list(load_groundtruth(dataset["groundtruth_val"]).items())[:1]))
    message = (r"ground truth .*one-val\.pk \(groundtruth_val\) cannot score validation roc_auc: no class has both positive "
               r"and negative tracks(.|\n)*Use a validation split where at least one class has both positive and negative tracks")

    with pytest.raises(ValueError, match=message):
        run(["demo"], {**dataset, **FAST, "groundtruth_val": str(one_track)})
    assert not (tmp_path / "probe").exists()  # nothing trained, nothing reported
    with pytest.raises(ValueError, match=message):  # the search says the same, also before any trial
        run(["demo", "probe_search"], {**dataset, **SEARCH, "groundtruth_val": str(one_track)})
    assert not (tmp_path / "probe").exists()


def _fail_extraction(dataset, tmp_path, names: dict[str, str]) -> dict[str, str]:
    """Remove the embeddings of the tracks ``names`` ({file name: reason}) and list them as the extraction does."""
    emb = tmp_path / "embeddings"
    failed = {}
    for name, reason in names.items():
        path = next(emb.rglob(f"{name}.embeddings.npy"))
        path.unlink()
        failed[str(path.relative_to(emb)).removesuffix(".embeddings.npy")] = reason
    (emb / "failed-embeddings.txt").write_text("".join(f"{k}\t{r}\n" for k, r in sorted(failed.items())))
    return failed


def test_tracks_whose_extraction_failed_are_left_out_listed_and_the_run_fails(dataset, tmp_path, capsys):
    from helpers.failures import read_failure_list

    failed = _fail_extraction(dataset, tmp_path, {"train-track-3.mmap": "not a whole number of frames",
                                                  "validation-track-2.mmap": "contains NaN",
                                                  "test-track-7.mmap": "does not exist"})
    out = tmp_path / "probe"
    (out).mkdir()
    (out / "failed-probe.txt").write_text("gone/track.mmap\tan earlier run's ground truth\n")

    with pytest.raises(SystemExit) as exit_info:
        run(["demo"], {**dataset, **FAST})

    assert exit_info.value.code == 1
    results = json.loads((out / "results.json").read_text())  # written before the exit
    assert results["n_tracks"] == {"train": 47, "val": 15, "test": 15}
    assert results["left_out"] == {"train": 1, "val": 1, "test": 1} and results["left_out_list"] == str(out / "failed-probe.txt")
    assert results["test"]["roc_auc"] > 0.9
    listed = read_failure_list(out / "failed-probe.txt")
    assert sorted(listed) == sorted(failed)  # the earlier run's entry of a track in no ground truth is gone
    for key, reason in failed.items():
        assert reason in listed[key]
    err = capsys.readouterr().err
    assert all(f"FAILED {key}: " in err for key in failed) and "3 track(s) skipped; listed in" in err

    with pytest.raises(SystemExit):  # the search leaves them out the same way
        run(["demo", "probe_search"], {**dataset, **SEARCH, "search_grid": {"lr": [1e-2]}, "search_seeds": 1})
    assert json.loads((out / "results.json").read_text())["left_out"] == {"train": 1, "val": 1, "test": 1}


def test_missing_embeddings_not_listed_as_failed_are_still_an_error_naming_them(dataset, tmp_path):
    _fail_extraction(dataset, tmp_path, {"test-track-7.mmap": "does not exist"})
    next((tmp_path / "embeddings").rglob("test-track-5.mmap.embeddings.npy")).unlink()  # never extracted

    with pytest.raises(MissingEmbeddingsError, match=r"1 of 80 embedding files are missing .*not listed in .*failed-embeddings"
                       r"\.txt \(never extracted\):\n  .*test-track-5\.mmap\.embeddings\.npy\n(.|\n)*1 other missing file"):
        run(["demo"], {**dataset, **FAST})
