"""Extraction on 2 CPU processes (gloo), launched as DDP training is: the same files as one process, resumable.

`python ex_maest.py extract_embeddings with ... predict.devices=2` starts rank 1 by running the
command again (Lightning's DDP launch). The command runs through a small wrapper script (in
tmp_path) that logs every file each rank writes and, when asked, kills the whole job (SIGKILL to
its process group) right after rank 1's first output file, as a scheduler or a dying node would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.extract import extract
from helpers.melfiles import save_groundtruth, write_mel
from models import get_maest
from models.mel import N_MELS

PROJECT = Path(__file__).resolve().parents[1]
N_FRAMES = 125  # 2 s clips
N_CLASSES = 5
# 8 keys: 7 readable files of 1 to 3 clips and one truncated file (key 5, rank 1's share)
LENGTHS = {"a/0.mmap": 187, "a/1.mmap": 250, "a/2.mmap": 40, "b/3.npy": 300, "b/4.mmap": 125, "bad.mmap": 130, "c/6.mmap": 200, "c/7.mmap": 90}

WRAPPER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import torch.distributed as dist

    import helpers.extract
    import helpers.failures

    LOG = Path(os.environ["EXTRACT_LOG"])
    KILL_RANK = os.environ.get("KILL_AFTER_FIRST_FILE_ON_RANK")


    def rank():
        return dist.get_rank() if dist.is_initialized() else -1


    def log(text):
        with open(LOG, "a") as f:
            f.write(f"{rank()} {text}\\n")


    def logged(module, name):
        original = getattr(module, name)

        def wrapper(path, *args, **kwargs):
            result = original(path, *args, **kwargs)
            log(f"wrote {path}")
            if name == "_write_atomic" and KILL_RANK == str(rank()):
                os.killpg(0, signal.SIGKILL)  # the whole job dies, rank 0 wherever it is
            return result

        setattr(module, name, wrapper)


    logged(helpers.extract, "_write_atomic")
    logged(helpers.extract, "write_text_atomic")  # config.json
    logged(helpers.failures, "write_text_atomic")  # the failure list

    if __name__ == "__main__":
        from ex_maest import main

        try:
            main()  # as `python ex_maest.py ...` runs
        except SystemExit as e:
            log(f"exit {e.code}")
            raise
        log("exit 0")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Mel files, a ground truth, a tiny checkpoint, and the 1-process reference extraction."""
    tmp = tmp_path_factory.mktemp("extract_ddp")
    rng = np.random.default_rng(0)
    for key, frames in LENGTHS.items():
        write_mel(tmp / "mels" / key, rng.uniform(0.0, 4.0, size=(frames, N_MELS)).astype(np.float16))
    (tmp / "mels" / "bad.mmap").write_bytes(b"\x00" * 101)  # not a whole number of frames
    gt = save_groundtruth(tmp / "gt.pk", {k: np.zeros(N_CLASSES, dtype=bool) for k in LENGTHS})
    torch.manual_seed(0)
    model = get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)
    checkpoint = tmp / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    reference = extract(model, base_dir=tmp / "mels", groundtruth=gt, out_dir=tmp / "one", block="all", n_frames=N_FRAMES,
                        batch_size=4, run_info={}, progress=False)
    assert list(reference.failed) == ["bad.mmap"]
    (tmp / "wrapper.py").write_text(WRAPPER)
    return tmp, gt, checkpoint


def run_two_processes(setup, out_dir: Path, log: Path, kill_rank: int | None = None, block: str = "all",
                      observer: tuple[str, ...] = ("-u",)) -> subprocess.CompletedProcess:
    tmp, gt, checkpoint = setup
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "EXTRACT_LOG": str(log),
    }
    env.pop("KILL_AFTER_FIRST_FILE_ON_RANK", None)
    if kill_rank is not None:
        env["KILL_AFTER_FIRST_FILE_ON_RANK"] = str(kill_rank)
    args = [
        "maest.arch=maest-tiny", f"maest.checkpoint={checkpoint}", f"maest.n_classes={N_CLASSES}", f"maest.input_t={N_FRAMES}",
        f"datamodule.base_dir={tmp / 'mels'}", f"datamodule.groundtruth_predict={gt}", "datamodule.clip_length=2",
        f"predict.out_dir={out_dir}", f"predict.transformer_block={block}", "predict.batch_size=4", "predict.num_workers=1",
        "predict.device=cpu", "predict.precision=fp32", "predict.devices=2",
    ]
    return subprocess.run(
        [sys.executable, str(tmp / "wrapper.py"), "extract_embeddings", *observer, "with", *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=240, start_new_session=True,  # the kill stays in its group
    )


def outputs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.npy") if not p.name.startswith("."))


def log_lines(log: Path) -> list[tuple[int, str]]:
    return [(int(rank), text) for rank, text in (line.split(" ", 1) for line in log.read_text().splitlines())]


def test_two_processes_resume_after_a_kill_and_write_the_files_of_one(setup):
    tmp, _, _ = setup
    out, log = tmp / "two", tmp / "two.log"

    killed = run_two_processes(setup, out, log, kill_rank=1)
    assert killed.returncode == -signal.SIGKILL, f"the kill did not happen:\n{killed.stdout[-2000:]}\n{killed.stderr[-4000:]}"
    first = log_lines(log)
    written_before = [(rank, text) for rank, text in first if text.startswith("wrote") and text.endswith(".embeddings.npy")]
    assert [rank for rank, _ in written_before].count(1) == 1  # rank 1 died right after its first file
    present = outputs(out)  # a write can finish between the kill and its log line: at least the logged ones
    assert {str(Path(text.split(" ", 1)[1]).relative_to(out)) for _, text in written_before} <= set(present) and len(present) < 7  # killed mid-run
    for name in present:
        assert np.load(out / name).shape[1:] == np.load(tmp / "one" / name).shape[1:]  # no file half-written

    rerun = run_two_processes(setup, out, log)
    assert rerun.returncode == 1, f"expected exit status 1 (one bad file):\n{rerun.stdout[-2000:]}\n{rerun.stderr[-4000:]}"
    lines = log_lines(log)[len(first):]

    # Exactly the files of one process, equal values.
    assert outputs(out) == outputs(tmp / "one") and len(outputs(out)) == 7
    for name in outputs(out):
        np.testing.assert_allclose(np.load(out / name), np.load(tmp / "one" / name), rtol=0, atol=1e-5)
    # The rerun wrote only what the kill left undone, split between the ranks; rank 1 had the bad file.
    rewritten = [(rank, Path(text.split(" ", 1)[1]).name) for rank, text in lines if text.endswith(".embeddings.npy")]
    assert len(rewritten) == 7 - len(present)
    assert {r for r, _ in rewritten} <= {0, 1}
    assert f"{7 - len(present)} written, {len(present)} already present, 1 failed" in rerun.stdout
    assert rerun.stdout.count("already present") == 1  # one summary, from rank 0
    # config.json claimed once over both runs (rank 0, first run); the failure list written once, by rank 0.
    writes = [(rank, Path(text.split(" ", 1)[1]).name) for rank, text in first + lines if text.startswith("wrote")]
    assert [w for w in writes if w[1] == "config.json"] == [(0, "config.json")]
    assert [w for w in writes if w[1] == "failed-embeddings.txt"] == [(0, "failed-embeddings.txt")]
    assert (out / "failed-embeddings.txt").read_text() == (tmp / "one" / "failed-embeddings.txt").read_text()
    assert "not a whole number" in (out / "failed-embeddings.txt").read_text()
    assert json.loads((out / "config.json").read_text())["blocks"] == [0, 1]
    # Rank 0 reports the failure and exits with status 1 (the command's); rank 1 exits 0, since Lightning's launcher
    # SIGKILLs rank 0 when another rank exits non-zero.
    assert sorted((rank, text) for rank, text in lines if text.startswith("exit")) == [(0, "exit 1"), (1, "exit 0")]
    assert rerun.stderr.count("FAILED bad.mmap") == 1


def test_two_processes_report_a_refused_folder_once(setup):
    """Rank 0's error (a folder of another setting) is printed once; rank 0 exits 1, rank 1 exits 0 quietly."""
    tmp, _, _ = setup
    log = tmp / "refused.log"
    refused = run_two_processes(setup, tmp / "one", log, block="0")  # "one" holds every block
    assert refused.returncode == 1, refused.stderr[-4000:]
    assert refused.stderr.count("holds outputs of another setting") == 1, refused.stderr[-4000:]
    assert "rank 0 stopped the extraction" not in refused.stderr
    assert sorted((rank, text) for rank, text in log_lines(log) if text.startswith("exit")) == [(0, "exit 1"), (1, "exit 0")]


def test_two_processes_keep_one_run_record_with_rank_0s_output(setup):
    """-F DIR on the command line: one record (rank 0's), holding its log lines and summary; the output capture
    ends cleanly (Sacred's default "fd" capture was inherited by rank 1 and ended in a tee timeout)."""
    tmp, _, checkpoint = setup
    good = save_groundtruth(tmp / "gt-good.pk", {k: np.zeros(N_CLASSES, dtype=bool) for k in LENGTHS if k != "bad.mmap"})
    done = run_two_processes((tmp, good, checkpoint), tmp / "recorded", tmp / "recorded.log", observer=("-F", str(tmp / "records")))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "tee_stdout" not in done.stderr and "tee_stderr" not in done.stderr, done.stderr[-4000:]
    records = [p for p in (tmp / "records").iterdir() if p.name != "_sources"]
    assert len(records) == 1, records
    cout = (records[0] / "cout.txt").read_text()
    assert "7 written, 0 already present, 0 failed" in cout and "INFO models.precision" in cout
    assert json.loads((records[0] / "run.json").read_text())["status"] == "COMPLETED"
