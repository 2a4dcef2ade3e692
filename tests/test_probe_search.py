"""helpers/probe_search.py: the fast training loop, the grid, the resumable journal, the summary and the plot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers.probe import ProbeData, ProbeTask
from helpers.probe_search import (
    ProbeSettings,
    TrialJournal,
    data_fingerprint,
    expand_grid,
    fit_probe,
    plot_search,
    run_search,
    summarise,
    to_tensors,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def separable(n_train=64, n_eval=24, dim=6, noise=0.8, seed=0) -> ProbeData:
    """Two multi-hot classes read off dimensions 0 and 1 (with noise), the rest noise."""
    rng = np.random.default_rng(seed)
    x, y = {}, {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        labels = rng.random((n, 2)) < 0.5
        labels[0], labels[1] = [True, False], [False, True]
        x[split] = rng.normal(0, noise, (n, dim)).astype(np.float32)
        x[split][:, :2] += np.where(labels, 1.0, -1.0)
        y[split] = labels.astype(np.float32)
    return ProbeData(x=x, y=y, keys={}, task=ProbeTask("multilabel", 2), blocks=[6], layer_combine="single")


def settings(**overrides) -> ProbeSettings:
    base = dict(lr=1e-2, weight_decay=1e-3, hidden_layers=1, hidden_size=8, dropout=0.1, batch_size=16, max_epochs=5,
                warm_up_len=1, ramp_down_start=2, ramp_down_len=3, last_lr_value=0.1, patience=None,
                selection_metric="roc_auc")
    return ProbeSettings(**{**base, **overrides})


def test_fit_is_deterministic_per_seed_and_keeps_the_best_epoch():
    data = separable()
    tensors = to_tensors(data)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)

    a = fit_probe(tensors, data.task, settings(), seed=1, test=True)
    assert torch.rand(1) == before  # the caller's random state is untouched
    b = fit_probe(tensors, data.task, settings(), seed=1, test=True)
    c = fit_probe(tensors, data.task, settings(), seed=2, test=True)

    assert a.val == b.val and a.test == b.test and a.best_epoch == b.best_epoch
    for (k, va), vb in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert c.val != a.val or c.test != a.test
    assert a.epochs == 5 and 0 <= a.best_epoch < 5 and a.val["roc_auc"] > 0.8 and a.test["roc_auc"] > 0.8
    # the network returned holds the best epoch: scoring it again gives the reported validation score
    again = data.task.metrics(data.y["val"], torch.sigmoid(a.net.eval()(tensors["val"][0])).detach().numpy())
    assert again["roc_auc"] == pytest.approx(a.val["roc_auc"])


def test_patience_stops_after_that_many_epochs_without_improvement():
    data = separable(noise=3.0)  # hardly learnable: the validation score wanders
    result = fit_probe(to_tensors(data), data.task, settings(max_epochs=40, patience=2, ramp_down_len=38), seed=0)
    assert result.epochs < 40 and result.epochs == result.best_epoch + 3
    with pytest.raises(ValueError, match=r"patience=0: use a number of epochs >= 1, or None"):
        settings(patience=0)
    with pytest.raises(ValueError, match=r"ramp_down_len=0 must be > 0"):
        settings(ramp_down_len=0)


def test_grid_expands_in_order_and_refuses_bad_keys():
    points = expand_grid({"lr": [1e-3, 1e-2], "hidden_layers": [0, 1, 2]})
    assert len(points) == 6 and points[0] == {"lr": 1e-3, "hidden_layers": 0} and points[3] == {"lr": 1e-2, "hidden_layers": 0}
    with pytest.raises(ValueError, match=r"search_grid\.momentum: not a setting a search can vary; use some of \('lr'"):
        expand_grid({"momentum": [0.9]})
    with pytest.raises(ValueError, match=r"search_grid\.lr=\[\]: give a non-empty list"):
        expand_grid({"lr": []})
    with pytest.raises(ValueError, match=r"search_grid\.hidden_size=\[512\.0\]: each value must be an integer >= 0"):
        expand_grid({"hidden_size": [512.0]})
    with pytest.raises(ValueError, match=r"search_grid is empty"):
        expand_grid({})


@pytest.mark.parametrize(
    "grid, match",
    [
        ({"lr": ["a"]}, r"search_grid\.lr=\['a'\]: each value must be a number > 0, not 'a'"),
        ({"lr": [0, 1e-3]}, r"search_grid\.lr=\[0, 0\.001\]: each value must be a number > 0, not 0"),
        ({"dropout": [0.1, 1.5]}, r"search_grid\.dropout=\[0\.1, 1\.5\]: each value must be a number in \[0, 1\), not 1\.5"),
        ({"batch_size": [0]}, r"search_grid\.batch_size=\[0\]: each value must be an integer >= 1"),
        ({"lrs": [1e-3]}, r"search_grid\.lrs: not a setting a search can vary; did you mean search_grid\.lr\?"),
        ({"lr": [1e-3], "dropouts": [0.1], "hidden_layers": [-1]},
         r"search_grid\.dropouts: .*did you mean search_grid\.dropout\?.*\n.*search_grid\.hidden_layers=\[-1\]: each value"),
    ],
)
def test_grid_values_are_checked_naming_the_key_and_what_is_allowed(grid, match):
    with pytest.raises(ValueError, match=match):
        expand_grid(grid)


def test_settings_name_the_bad_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"lr='abc': use a number > 0"):
        settings(lr="abc")
    with pytest.raises(ValueError, match=r"hidden_layers=-1: use an integer >= 0"):
        settings(hidden_layers=-1)
    with pytest.raises(ValueError, match=r"max_epochs=0: use an integer >= 1"):
        settings(max_epochs=0)


def test_summary_uses_the_sample_standard_deviation():
    s = summarise([0.80, 0.90, 0.85])
    assert s["mean"] == pytest.approx(0.85)
    assert s["std"] == pytest.approx(0.05)  # sqrt(((-.05)^2 + .05^2 + 0) / (3 - 1))
    assert s["values"] == [0.80, 0.90, 0.85]
    assert summarise([0.7]) == {"mean": 0.7, "std": None, "values": [0.7]}


def test_search_picks_the_best_trial_reuses_linear_duplicates_and_resumes(tmp_path):
    data = separable()
    grid = {"lr": [1e-3, 3e-2], "hidden_layers": [0, 1], "dropout": [0.1, 0.5]}
    journal = tmp_path / "trials.jsonl"

    first = run_search(data, base=settings(), grid=grid, seed=0, n_seeds=2, journal_path=journal)

    trials = first["trials"]
    assert len(trials) == 8 and [t["setting"] for t in trials[:2]] == [
        {"lr": 1e-3, "hidden_layers": 0, "dropout": 0.1}, {"lr": 1e-3, "hidden_layers": 0, "dropout": 0.5}]
    assert trials[1]["same_as"] == 0 and trials[1]["val"] == trials[0]["val"]  # a linear probe has no dropout
    # every trial has both keys, as README shows: a trained one same_as null, a copy resumed null
    assert (trials[0]["same_as"], trials[0]["resumed"], trials[1]["resumed"]) == (None, False, None)
    scores = [t["score"] for t in trials]
    assert first["best"]["trial"] == int(np.argmax(scores)) and first["best"]["val_roc_auc"] == max(scores)
    assert [s["seed"] for s in first["seeds"]] == [0, 1]
    values = [s["test"]["roc_auc"] for s in first["seeds"]]
    assert first["test"]["roc_auc"]["values"] == values
    assert first["test"]["roc_auc"]["std"] == pytest.approx(np.std(values, ddof=1))
    lines = journal.read_text().splitlines()
    assert len(lines) == 6 + 2  # 6 distinct settings trained + 2 seeds

    journal.write_text(journal.read_text() + '{"id": "half a li')  # a run killed while appending
    again = run_search(data, base=settings(), grid=grid, seed=0, n_seeds=2, journal_path=journal)
    assert all(t["resumed"] in (True, None) for t in again["trials"]) and all(s["resumed"] for s in again["seeds"])  # None: a copy
    def without_resumed(results):
        return [{k: v for k, v in entry.items() if k != "resumed"} for entry in results["trials"] + results["seeds"]]

    assert without_resumed(again) == without_resumed(first)
    assert journal.read_text().splitlines() == lines  # the half line is gone, nothing new was trained

    other = dataclasses.replace(data, y={**data.y, "train": 1 - data.y["train"]})  # other data: nothing reused
    assert TrialJournal(journal, data_fingerprint(other, "cpu")).records == {}


def test_plot_is_a_png_with_a_panel_per_hidden_layer_count(tmp_path):
    data = separable()
    grid = {"lr": [1e-3, 1e-2, 3e-2], "hidden_layers": [0, 1], "dropout": [0.1, 0.5]}
    results = run_search(data, base=settings(max_epochs=2, ramp_down_start=1, ramp_down_len=1), grid=grid, seed=0,
                         n_seeds=1, journal_path=tmp_path / "trials.jsonl")

    path = plot_search(results, tmp_path / "search.png")

    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000
    width = int.from_bytes(content[16:20], "big")
    assert width > 2 * 300  # two panels side by side
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_a_rerun_counts_exactly_the_trainings_it_reuses_and_numbers_trials_as_results_do(tmp_path, caplog):
    data = separable(n_train=32, n_eval=12)
    grid = {"lr": [1e-2, 3e-2], "hidden_layers": [0, 1], "dropout": [0.1, 0.5]}  # 8 points, 6 trainings
    journal = tmp_path / "trials.jsonl"
    short = settings(max_epochs=2, ramp_down_start=1, ramp_down_len=1)
    with caplog.at_level("INFO", logger="helpers.probe_search"):
        first = run_search(data, base=short, grid=grid, seed=0, n_seeds=2, journal_path=journal)
    assert "reused" not in caplog.text  # a new journal: nothing to say
    best = first["best"]["trial"]
    assert f"trial {best} ({best + 1} of 8) {first['trials'][best]['setting']}: val roc_auc" in caplog.text  # results.json's number

    caplog.clear()
    other = dataclasses.replace(short, max_epochs=3, ramp_down_start=2)  # other settings: every training is new
    with caplog.at_level("INFO", logger="helpers.probe_search"):
        second = run_search(data, base=other, grid=grid, seed=0, n_seeds=1, journal_path=journal)
    assert not any(t.get("resumed") for t in second["trials"])
    assert f"{journal}: 0 of the grid's 6 training(s) reused; 8 line(s) of other data or settings ignored" in caplog.text
    assert f"{journal}: 0 of the best setting's 1 seed run(s) reused" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="helpers.probe_search"):  # the first settings again: 6 + 2 of the 15 lines
        third = run_search(data, base=short, grid=grid, seed=0, n_seeds=2, journal_path=journal)
    assert all(t["resumed"] in (True, None) for t in third["trials"]) and all(s["resumed"] for s in third["seeds"])
    assert (f"{journal}: 6 of the grid's 6 training(s) reused, 2 seed run(s) of grid settings kept for the retraining of "
            "the best; 7 line(s) of other data or settings ignored") in caplog.text
    assert f"{journal}: 2 of the best setting's 2 seed run(s) reused" in caplog.text


def test_a_search_refuses_a_validation_split_that_cannot_score_before_any_trial(tmp_path):
    data = separable()
    data = dataclasses.replace(data, y={**data.y, "val": np.ones_like(data.y["val"])}, groundtruths={"val": "gt-val.pk"})
    with pytest.raises(ValueError, match=r"ground truth gt-val\.pk \(groundtruth_val\) cannot score validation roc_auc: no "
                       r"class has both positive and negative tracks.*at least one class has both positive and negative"):
        run_search(data, base=settings(), grid={"lr": [1e-2]}, seed=0, n_seeds=1, journal_path=tmp_path / "trials.jsonl")
    assert not (tmp_path / "trials.jsonl").exists()
