"""Your own audio in three commands: prepare_folder writes dataset.json, training takes it, outputs go to the run's folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import pytest
import soundfile as sf

from configs.runs import run_name_for
from datasets.prepare_folder import MIN_FRAMES, MIN_SECONDS, prepare_folder
from ex_maest import ex
from helpers.melfiles import load_groundtruth
from helpers.probe import embedding_path
from models.mel import n_frames_for

CLIP = 0.5  # seconds: 31 frames, two time patches of maest-tiny
TINY = {  # the demo's recipe on a tiny model, one short epoch
    "maest": {"arch": "maest-tiny", "input_t": n_frames_for(CLIP), "s_patchout_t": 0, "s_patchout_f": 0},
    "datamodule": {"clip_length": CLIP, "batch_size_train": 4, "batch_size_test": 4, "epoch_length": 8, "num_workers": 0},
    "trainer": {"max_epochs": 1, "accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False, "enable_model_summary": False},
}


def write_tone(path: Path, freq: float, seconds: float, sample_rate: int = 16000) -> None:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sample_rate)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """bass and treble: 5 one-second files each; rare: one file, so it misses validation or test; one 0.1 s file."""
    root = tmp_path_factory.mktemp("own")
    audio = root / "audio"
    for label, freq in (("bass", 200.0), ("treble", 3000.0)):
        for i in range(5):
            write_tone(audio / label / f"{label}_{i}.wav", freq, 1.0)
    write_tone(audio / "rare" / "rare_0.wav", 800.0, 1.0)
    write_tone(audio / "bass" / "blip.wav", 200.0, 0.1)  # 7 frames: shorter than one patch
    out = root / "prepared"
    logger = logging.getLogger("datasets.prepare_folder")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = prepare_folder(audio, out, split=(0.6, 0.2, 0.2), seed=0)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"root": root, "out": out, "result": result, "log": [r.getMessage() for r in records]}


def test_dataset_json_holds_every_datamodule_key_labels_and_n_classes(prepared):
    out, result = prepared["out"], prepared["result"]
    config = json.loads((out / "dataset.json").read_text())

    assert result.dataset_config == out / "dataset.json"
    assert config["maest"] == {"n_classes": 3}
    dm = config["datamodule"]
    assert dm["labels"] == ["bass", "rare", "treble"] == (out / "labels.txt").read_text().split()
    assert dm["base_dir"] == str(out.resolve())
    for key, split in (("groundtruth_train", "train"), ("groundtruth_val", "validation"), ("groundtruth_test", "test"), ("groundtruth_predict", "all")):
        assert Path(dm[key]).is_absolute() and dm[key] == str((out / f"groundtruth-{split}.pk").resolve())  # works from any cwd
    assert len(load_groundtruth(dm["groundtruth_predict"])) == 12
    assert set(dm) <= _datamodule_keys()  # only keys ex_maest.py declares (Sacred refuses others)


def _datamodule_keys() -> set[str]:
    return set(ex.run("print_config", options={"--loglevel": "ERROR"}).config["datamodule"])


def test_preparer_warns_about_short_files_and_labels_missing_from_a_split(prepared):
    result, log = prepared["result"], "\n".join(prepared["log"])
    assert (MIN_FRAMES, round(MIN_SECONDS, 3)) == (16, 0.24)  # (16 - 1) * 256 / 16000: centred frames
    assert result.short == ["mels/bass/blip.mmap"]
    assert "1 file(s) are shorter than one 16-frame patch (0.240 s)" in log and "mels/bass/blip.mmap" in log
    counts = result.class_counts
    assert [sum(c[1] for c in counts.values())] == [1] and sum(counts["train"]) + sum(counts["validation"]) + sum(counts["test"]) == 12
    missing = [name for name in ("validation", "test") if counts[name][1] == 0]  # "rare" has one file: at most one split
    assert missing and all(f"no file in the {name} split and cannot be scored there" in log for name in missing)
    assert "files per label and split" in log and "rare" in log


def test_train_on_dataset_json_then_extract_into_the_runs_folder(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outputs/ of the run goes here
    dataset_json = str(prepared["out"] / "dataset.json")

    # `python ex_maest.py with demo OUT/dataset.json` (+ tiny sizes): Sacred reads the JSON file as a named config.
    run = ex.run(named_configs=["demo", dataset_json], config_updates=TINY, options={"--loglevel": "ERROR"})

    assert run.status == "COMPLETED"
    name = run.config["run_name"]
    assert name.startswith("prepared_maest-tiny_") and len(name.rsplit("_", 1)[1]) == 8
    last = tmp_path / "outputs" / name / "train" / "checkpoints" / "last.ckpt"
    assert Path(run.result["last_checkpoint"]).resolve() == last.resolve() and last.is_file()
    assert run.config["maest"]["n_classes"] == 3 and run.config["datamodule"]["labels"] == ["bass", "rare", "treble"]
    # The demo dataset is not used: nothing synthetic is generated, the demo's folders are untouched.
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [name]

    # Third command, the same configs: the demo's inference_checkpoint="last" is this run's newest
    # checkpoint (not the demo's), and the embeddings land in the same run's folder.
    extract = ex.run("extract_embeddings", named_configs=["demo", dataset_json], config_updates=TINY, options={"--loglevel": "ERROR"})
    assert extract.config["run_name"] == name and extract.config["inference_checkpoint"] == "last"
    written = json.loads((tmp_path / "outputs" / name / "embeddings" / "config.json").read_text())
    assert Path(written["checkpoint"]).resolve() == last.resolve()
    # No block given: depth // 2 (the paper's 6 of 12), here block 1 of the 2-block model.
    assert written["block"] == 1
    for key in load_groundtruth(run.config["datamodule"]["groundtruth_predict"]):
        assert np.load(embedding_path(tmp_path / "outputs" / name / "embeddings", key)).shape[1:] == (3, 64)
    assert written["weights"].startswith("sha256:") and written["base_dir"] == str(Path(run.config["datamodule"]["base_dir"]).absolute())

    # Training again rewrites last.ckpt in place: the same path, other weights. The folder's embeddings
    # are of the old model, so the extraction refuses to resume into it instead of keeping them.
    ckpt = torch.load(last, weights_only=False)
    ckpt["state_dict"] = {k: v + 0.01 if k.startswith("net_swa.head") else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, last)
    with pytest.raises(ValueError, match=r"holds outputs of another setting \(weights: 'sha256:[0-9a-f]{16}' there, 'sha256:[0-9a-f]{16}' now\)"):
        ex.run("extract_embeddings", named_configs=["demo", dataset_json], config_updates=TINY, options={"--loglevel": "ERROR"})


def test_inference_checkpoint_last_before_training_names_the_folder_and_the_fix(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dataset_json = str(prepared["out"] / "dataset.json")
    with pytest.raises(FileNotFoundError) as error:
        ex.run("predict", named_configs=["demo", dataset_json], config_updates={**TINY, "predict": {"audio": ["x.wav"]}}, options={"--loglevel": "ERROR"})
    message = str(error.value)
    assert "inference_checkpoint='last'" in message and "train it first with the same named configs" in message
    folder = Path(message.split(" in ", 1)[1].split(",", 1)[0])
    assert folder.parts[-2:] == ("train", "checkpoints")
    assert folder.parts[-4] == "outputs" and folder.parts[-3].startswith("prepared_maest-tiny_")  # this config's run, not outputs/demo
    assert not (tmp_path / "outputs" / "demo").exists()
    assert "Runs on the same data and model" not in message

    # A run on the same data and model with other keys (another hash): named, with its newest checkpoint.
    other = tmp_path / "outputs" / (folder.parts[-3].rsplit("_", 1)[0] + "_0123abcd") / "train" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    torch.save({"global_step": 1}, other)  # a readable checkpoint (an unreadable one is passed over)
    with pytest.raises(FileNotFoundError) as error:
        ex.run("predict", named_configs=["demo", dataset_json], config_updates={**TINY, "predict": {"audio": ["x.wav"]}}, options={"--loglevel": "ERROR"})
    assert str(error.value).endswith(f"have these (give one as inference_checkpoint=...):\n  {Path('outputs') / other.relative_to(tmp_path / 'outputs')}")


def test_ckpt_path_last_without_a_checkpoint_names_runs_with_one_and_the_keys_they_differ_in(prepared, tmp_path, monkeypatch):
    """Resuming with another key (here trainer.devices: a job moved to fewer GPUs) names another folder: the error
    names the run that has a checkpoint, and the keys its Sacred record differs in."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAEST_SACRED_DIR", raising=False)
    named = ["demo", str(prepared["out"] / "dataset.json")]
    config = ex.run("print_config", named_configs=named, config_updates=TINY, options={"--loglevel": "ERROR"}).config
    earlier = json.loads(json.dumps({**config, "trainer": {**config["trainer"], "devices": 4}, "seed": 3}))
    earlier["run_name"] = run_name_for(earlier)
    assert earlier["run_name"] != config["run_name"] and earlier["run_name"].rsplit("_", 1)[0] == config["run_name"].rsplit("_", 1)[0]
    last = tmp_path / "outputs" / earlier["run_name"] / "train" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 1}, last)  # a readable checkpoint (an unreadable one is passed over)
    record = tmp_path / "outputs" / "sacred" / "3" / "config.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(earlier))

    with pytest.raises(FileNotFoundError) as error:
        ex.run("main", named_configs=named, config_updates={**TINY, "ckpt_path": "last"}, options={"--loglevel": "ERROR"})
    message = str(error.value)
    assert "ckpt_path='last' but" in message and "nothing to resume" in message
    assert message.endswith(
        "Runs on the same data and model with other keys have these (resume one in its folder with run_name=<its folder> "
        f"ckpt_path=last):\n  {Path('outputs') / earlier['run_name'] / 'train' / 'checkpoints' / 'last.ckpt'}  "
        f"(keys that differ: seed 3 there, {config['seed']} here; trainer.devices 4 there, \"auto\" here)"
    )
    # A run of the same data and model in a folder named with run_name=: found by its Sacred record.
    mine = {**earlier, "run_name": "mine", "seed": 5}
    mine_last = tmp_path / "outputs" / "mine" / "train" / "checkpoints" / "last.ckpt"
    mine_last.parent.mkdir(parents=True)
    torch.save({"global_step": 2}, mine_last)
    (tmp_path / "outputs" / "sacred" / "4").mkdir()
    (tmp_path / "outputs" / "sacred" / "4" / "config.json").write_text(json.dumps(mine))
    with pytest.raises(FileNotFoundError) as error:
        ex.run("main", named_configs=named, config_updates={**TINY, "ckpt_path": "last"}, options={"--loglevel": "ERROR"})
    assert f"\n  {Path('outputs') / 'mine' / 'train' / 'checkpoints' / 'last.ckpt'}  (keys that differ: seed 5 there" in str(error.value)


def test_run_name_is_the_same_for_the_same_command_and_differs_otherwise(prepared):
    dataset_json = str(prepared["out"] / "dataset.json")

    def name(named=("demo", dataset_json), **updates):
        r = ex.run("print_config", named_configs=list(named), config_updates={**TINY, **updates}, options={"--loglevel": "ERROR"})
        return r.config["run_name"]

    first = name()
    assert name() == first
    assert name(ckpt_path="last", checkpoint_every_n_train_steps=5) == first  # resuming finds the run's folder
    assert name(datamodule={**TINY["datamodule"], "num_workers": 2}) == first  # speed, not results
    assert name(trainer={**TINY["trainer"], "max_epochs": 2}) != first
    assert name(seed=1) != first
    assert name(run_name="mine") == "mine"
    assert name(named=("demo",)) == "demo"  # the demo's synthetic data keeps its documented outputs/demo/...
    # Every config is seeded (0 unless given): the same folder is the same numbers, not another random draw.
    runs = [ex.run("print_config", named_configs=["finetune", dataset_json], options={"--loglevel": "ERROR"}) for _ in range(2)]
    assert [r.config["seed"] for r in runs] == [0, 0] and runs[0].config["run_name"] == runs[1].config["run_name"]
    assert run_name_for({"datamodule": {"base_dir": "data/discogs/mels"}, "maest": {"arch": "x"}}).startswith("discogs_x_")


def test_a_run_from_a_checkpoint_is_named_after_the_arch_it_records(tmp_path):
    """Fine-tuning from outputs/<run>/train/checkpoints/last.ckpt was named <dataset>_last_<hash>."""
    import torch

    from models.checkpoints import MODEL_RECORD_KEY

    (tmp_path / "run").mkdir()
    torch.save({MODEL_RECORD_KEY: {"arch": "maest-demo", "config": {"n_classes": 3}, "labels": None}, "state_dict": {}}, tmp_path / "run" / "last.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")  # records nothing: its file's name
    data = {"base_dir": "data/mine"}
    assert run_name_for({"datamodule": data, "maest": {"checkpoint": str(tmp_path / "run" / "last.ckpt")}}).startswith("mine_maest-demo_")
    assert run_name_for({"datamodule": data, "maest": {"checkpoint": str(tmp_path / "bare.ckpt")}}).startswith("mine_bare_")
    assert run_name_for({"datamodule": data, "maest": {"checkpoint": str(tmp_path / "gone.ckpt")}}).startswith("mine_gone_")


def test_a_bad_run_name_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"run_name must be a folder name \(no '/', .*got '\.\./x'"):
        ex.run(named_configs=["demo"], config_updates={"run_name": "../x"}, options={"--loglevel": "ERROR"})
    assert not (tmp_path / "outputs").exists()


def test_using_a_trained_model_writes_into_its_runs_folder():
    from configs.runs import trained_run_name

    assert trained_run_name({"inference_checkpoint": "outputs/prepared_maest-demo_37cf859c/train/checkpoints/last.ckpt"}) == "prepared_maest-demo_37cf859c"
    assert trained_run_name({"inference_checkpoint": "/abs/outputs/demo/train/checkpoints/epoch=3-best.ckpt"}) == "demo"
    assert trained_run_name({"inference_checkpoint": None, "maest": {"checkpoint": "outputs/r1/train/checkpoints/step-step=5.ckpt"}}) == "r1"
    assert trained_run_name({"maest": {"checkpoint": "weights/discogs-maest-30s-pw-129e-swa.ckpt"}}) is None
    assert trained_run_name({"inference_checkpoint": "elsewhere/train/checkpoints/last.ckpt"}) is None
    # The experiment's hook: a command that uses the model takes <run>; training and print_config never do.
    import ex_maest

    config = {"run_name": None, "inference_checkpoint": "outputs/my_run/train/checkpoints/last.ckpt", "datamodule": {"base_dir": "x"}, "maest": {"arch": "a"}}
    assert ex_maest._run_name_hook(config, "extract_embeddings", None) == {"run_name": "my_run"}
    assert ex_maest._run_name_hook(config, "predict", None) == {"run_name": "my_run"}
    assert ex_maest._run_name_hook(config, "main", None)["run_name"].startswith("x_a_")
