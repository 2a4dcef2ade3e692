"""Lightning DDP on 2 CPU processes (gloo): the training draw is sharded once, evaluation is gathered.

Lightning's "ddp" strategy starts the other rank by running the same script again, so the
training runs in a small script written to tmp_path, in a subprocess; every rank writes what it
saw to a JSON file that the test then checks against a single-process computation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.failures import read_failure_list
from helpers.metrics import macro_metrics
from helpers.sampler import BalancedSampler
from helpers.synthetic import make_synthetic_dataset
from models import get_maest
from tests.builders import maest_datamodule

PROJECT = Path(__file__).resolve().parents[1]
CLIP_LENGTH = 2
INPUT_T = 125
EPOCH_LENGTH = 24  # 12 draws per rank: 3 batches of 4
BATCH_SIZE = 4
EPOCHS = 2
SEED = 7

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from configs.ingredients.module import module_config
    from helpers.datamodule import MAESTDataModule
    from helpers.module import MAESTModule
    from models import get_maest

    config = json.loads(Path(sys.argv[1]).read_text())
    out = Path(config["out_dir"])


    class Record(pl.Callback):
        \"\"\"The keys this rank trained and validated on.\"\"\"

        def __init__(self):
            self.train, self.val, self.losses = {}, {}, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.train.setdefault(trainer.current_epoch, []).extend(batch[1])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.val.setdefault(trainer.current_epoch, []).extend(batch[1])


    if __name__ == "__main__":
        torch.manual_seed(0)
        dm = MAESTDataModule(
            base_dir=config["base_dir"], clip_length=config["clip_length"],
            groundtruth_train=config["groundtruth_train"], groundtruth_val=config["groundtruth_val"],
            groundtruth_test=None, batch_size_train=config["batch_size"], batch_size_test=3, num_workers=0,
            epoch_length=config["epoch_length"], sampler="balanced", sampler_replacement=True, seed=config["seed"],
            teacher_dir=None, teacher_threshold=0.45, test_hop="full", pin_memory=False,
        )
        net = get_maest("maest-tiny", n_classes=dm.n_classes, input_t=config["input_t"], s_patchout_t=2)
        module = MAESTModule(net, **{**dict(module_config()), "lr": 1e-3, "swa_epoch_start": 1, "swa_freq": 1, "swa_lr": None})
        record = Record()
        trainer = pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_epochs=config["epochs"], precision="32-true",
            use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=out,
            callbacks=[record, ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)],
        )
        trainer.fit(module, datamodule=dm)
        rank = trainer.global_rank
        (out / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "train": record.train,
            "val": record.val,
            "losses": record.losses,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env() -> dict:
    """Environment of a 2-process CPU DDP run: the project importable, one local port, no GPU."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_synthetic_dataset(tmp / "data", n_tracks=40, clip_length=float(CLIP_LENGTH))
    config = {
        "out_dir": str(tmp / "run"),
        "base_dir": data["base_dir"],
        "groundtruth_train": data["groundtruth_train"],
        "groundtruth_val": data["groundtruth_val"],
        "clip_length": CLIP_LENGTH,
        "input_t": INPUT_T,
        "batch_size": BATCH_SIZE,
        "epoch_length": EPOCH_LENGTH,
        "seed": SEED,
        "epochs": EPOCHS,
    }
    (tmp / "config.json").write_text(json.dumps(config))
    script = tmp / "train_ddp.py"
    script.write_text(SCRIPT)
    env = _ddp_env()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp / "config.json")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=420,  # generous: a loaded 2-core machine runs it several times slower
    )
    assert proc.returncode == 0, f"DDP training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((tmp / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    return data, ranks, tmp / "run" / "checkpoints" / "last.ckpt"


def test_both_ranks_trained_in_step(ddp_run):
    _, ranks, last = ddp_run
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    steps_per_epoch = EPOCH_LENGTH // 2 // BATCH_SIZE
    assert {r["global_step"] for r in ranks} == {EPOCHS * steps_per_epoch}
    assert last.is_file()


def test_the_logged_training_loss_is_the_mean_over_both_ranks(ddp_run):
    _, ranks, _ = ddp_run
    last = str(EPOCHS - 1)
    losses = [loss for r in ranks for loss in r["losses"][last]]  # equal batches: the mean of the batch means
    assert len(losses) == 2 * (EPOCH_LENGTH // 2 // BATCH_SIZE)
    assert ranks[0]["losses"][last] != ranks[1]["losses"][last]  # the ranks trained on other draws
    for r in ranks:
        assert r["metrics"]["train_loss_epoch"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_training_draw_is_sharded_once_across_ranks(ddp_run):
    data, ranks, _ = ddp_run
    dm = maest_datamodule(base_dir=data["base_dir"], clip_length=CLIP_LENGTH, groundtruth_train=data["groundtruth_train"])
    train = dm.dataset("train")
    sampler = BalancedSampler(labels=train.labels, epoch_length=EPOCH_LENGTH, seed=SEED)  # one process
    draws = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        draw = [train.key(i) for i in sampler.epoch_indices().tolist()]
        draws.append(draw)
        shares = [r["train"][str(epoch)] for r in ranks]
        # Rank r takes positions r, r + 2, ...: disjoint shares that together are the whole draw.
        assert shares[0] == draw[0::2] and shares[1] == draw[1::2]
        assert sorted(shares[0] + shares[1]) == sorted(draw)
    assert draws[0] != draws[1]  # every epoch draws anew


def test_validation_is_computed_once_over_all_ranks(ddp_run):
    data, ranks, last = ddp_run
    dm = maest_datamodule(
        base_dir=data["base_dir"], clip_length=CLIP_LENGTH, groundtruth_val=data["groundtruth_val"], batch_size_test=64
    )
    dm.setup("validate")
    x, keys, y = next(iter(dm.val_dataloader()))
    assert len(keys) == len(dm.dataset("val"))  # one batch: every validation clip
    final_epoch = str(EPOCHS - 1)
    shares = [r["val"][final_epoch] for r in ranks]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(keys)  # each clip validated exactly once
    assert abs(len(shares[0]) - len(shares[1])) <= 1

    # The logged metrics are those of all clips together, the same on both ranks.
    for weights, suffix in ((False, ""), (True, "_swa")):
        net = get_maest("maest-tiny", checkpoint=last, checkpoint_swa_weights=weights, n_classes=dm.n_classes, input_t=INPUT_T)
        with torch.no_grad():
            logits = net(x)
        expected = macro_metrics(y.numpy(), torch.sigmoid(logits).numpy())
        loss = F.binary_cross_entropy_with_logits(logits, y).item()
        for r in ranks:
            assert r["metrics"][f"val_roc{suffix}"] == pytest.approx(expected["roc_auc"], abs=1e-5)
            assert r["metrics"][f"val_ap{suffix}"] == pytest.approx(expected["pr_auc"], abs=1e-5)
            assert r["metrics"][f"val_loss{suffix}"] == pytest.approx(loss, abs=1e-5)
    # A per-rank metric would differ from the all-clips one.
    half = [keys.index(k) for k in shares[0]]
    per_rank = macro_metrics(y[half].numpy(), torch.sigmoid(logits[half]).numpy())["roc_auc"]
    assert per_rank != pytest.approx(ranks[0]["metrics"]["val_roc_swa"], abs=1e-4)


def test_ex_maest_command_line_trains_with_ddp(ddp_run, tmp_path):
    """`python ex_maest.py with demo ... trainer.strategy=ddp trainer.devices=2`: Lightning reruns the
    command for rank 1; Trainer arguments the config does not list (limit_val_batches) are accepted."""
    data, _, _ = ddp_run
    root = tmp_path / "train"
    args = [
        "demo", "synthetic_data.out_dir=None", "inference_checkpoint=None",
        f"datamodule.base_dir={data['base_dir']}",
        f"datamodule.groundtruth_train={data['groundtruth_train']}",
        f"datamodule.groundtruth_val={data['groundtruth_val']}",
        f"datamodule.clip_length={CLIP_LENGTH}", f"datamodule.epoch_length={EPOCH_LENGTH}",
        f"datamodule.batch_size_train={BATCH_SIZE}",
        "maest.arch=maest-tiny", f"maest.input_t={INPUT_T}", "maest.s_patchout_t=3",
        f"trainer.max_epochs={EPOCHS}", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.precision=32-true", f"trainer.default_root_dir={root}", "trainer.enable_progress_bar=False",
        "trainer.logger=False", "trainer.limit_val_batches=1",
    ]
    env = _ddp_env()
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "ex_maest.py"), "-u", "with", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,  # generous: a loaded 2-core machine runs it several times slower
    )
    assert proc.returncode == 0, f"ex_maest.py with DDP failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("Training finished.") == 1  # the report comes from rank 0 only
    assert "It is recommended to use `self.log('val_" not in proc.stderr  # the gathered metrics need no reduction advice
    output = proc.stdout + proc.stderr
    assert output.count("Completed after") == 1 and "No observers have been added" not in output  # rank 1's run is quiet
    assert output.count("GPU available: False") == 1  # Lightning's lines once (it is imported after the logging is set up)
    assert "It is recommended to use `self.log('train_loss'" not in proc.stderr  # the training loss is reduced (sync_dist)
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == EPOCHS - 1 and state["global_step"] == EPOCHS * EPOCH_LENGTH // 2 // BATCH_SIZE
    assert {k.split(".")[0] for k in state["state_dict"]} == {"net", "net_swa", "swa_n_averaged"}


def test_ex_maest_ddp_training_skips_unreadable_training_files_of_both_ranks_and_lists_them_once(ddp_run, tmp_path):
    """Each rank's DataLoader skips the unreadable files it draws (the next track in their place, so the
    ranks keep in step); rank 0 gathers every rank's skips into one failed-train.txt and exits 1, the
    other rank exits 0."""
    import shutil

    data, _, _ = ddp_run
    base = tmp_path / "mels"
    shutil.copytree(data["base_dir"], base)
    dm = maest_datamodule(base_dir=str(base), clip_length=CLIP_LENGTH, groundtruth_train=data["groundtruth_train"])
    train = dm.dataset("train")
    n = len(train)
    bad = set(range(0, n, 3))  # every third training track truncated
    for track in bad:
        path = base / train.key(track)
        path.write_bytes(path.read_bytes()[:-5])
    # The whole draw (both ranks' shares), and the bad tracks each drawn track walks past to a readable one.
    sampler = BalancedSampler(labels=train.labels, epoch_length=EPOCH_LENGTH, seed=0, replacement=True)
    expected = set()
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for track in sampler.epoch_indices().tolist():
            while track in bad:
                expected.add(train.key(track))
                track = (track + 1) % n
    shares = [[t for t in sampler.epoch_indices().tolist()[r::2] if t in bad] for r in range(2)]
    assert all(shares), "both ranks draw a bad file in the last epoch"

    root = tmp_path / "train"
    args = [
        "demo", "synthetic_data.out_dir=None", "inference_checkpoint=None", f"datamodule.base_dir={base}",
        f"datamodule.groundtruth_train={data['groundtruth_train']}", f"datamodule.groundtruth_val={data['groundtruth_val']}",
        f"datamodule.clip_length={CLIP_LENGTH}", f"datamodule.epoch_length={EPOCH_LENGTH}", f"datamodule.batch_size_train={BATCH_SIZE}",
        "datamodule.sampler=balanced", "datamodule.sampler_replacement=True", "datamodule.seed=0", "datamodule.num_workers=1",
        "maest.arch=maest-tiny", f"maest.input_t={INPUT_T}", "maest.s_patchout_t=3",
        f"trainer.max_epochs={EPOCHS}", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.precision=32-true", f"trainer.default_root_dir={root}", "trainer.enable_progress_bar=False",
        "trainer.logger=False", "trainer.limit_val_batches=1",
    ]
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "ex_maest.py"), "-u", "with", *args],
        cwd=tmp_path, env=_ddp_env(), capture_output=True, text=True, timeout=420,  # generous: a loaded 2-core machine runs it several times slower
    )
    assert proc.returncode == 1, f"expected rank 0's exit 1:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("Training finished.") == 1
    listed = read_failure_list(root / "failed-train.txt")
    assert set(listed) == expected
    assert proc.stderr.count(f"{len(expected)} training file(s) skipped; listed in {root / 'failed-train.txt'}") == 1
    assert "Connection closed by peer" not in proc.stderr
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == EPOCHS * EPOCH_LENGTH // 2 // BATCH_SIZE  # every step trained on both ranks
