"""A small, deterministic, multi-label synthetic "music" dataset in the stored formats (SPEC §3).

The ``demo`` configs and the tests train on it: no download, a few seconds to generate on a laptop
CPU, and labels a small ViT learns in a few epochs. Each label is a sound with its own frequency
region and temporal pattern, so it is plainly visible in the mel spectrogram:

=============  =====================================================  ==============
label          sound                                                  region
=============  =====================================================  ==============
slow rhythm    kick drum (pitch drop 110 -> 45 Hz) at 50-80 BPM       < 120 Hz
low tone       steady sine at 140-190 Hz                              mel bands 4-6
major chord    sine triad (0, 4, 7 semitones), root 262-330 Hz        262-495 Hz
minor chord    sine triad (0, 3, 7 semitones), root 600-700 Hz        600-1050 Hz
vibrato        sine at 1.5-2 kHz, 5-7 Hz vibrato of +-4 %             1.4-2.1 kHz
high tone      steady sine at 2.8-3.4 kHz                             2.8-3.4 kHz
sweep          repeated exponential up-sweeps 3.8 -> 5.2 kHz          3.8-5.2 kHz
fast rhythm    hi-hat noise bursts above 6 kHz, 6-8 per second        > 6 kHz
white noise    steady broadband noise                                 everywhere
brown noise    steady 1/f^2 noise                                     mostly < 500 Hz
=============  =====================================================  ==============

Every track has 1 to 3 labels with random gains, phases and pitches inside each label's range,
and lasts 0.8 to 1.4 times ``clip_length`` so cropping, padding and clip cutting all happen.
Track ``i`` depends only on ``(seed, i)``: the output is the same for any ``n_jobs``.

Layout under ``out_dir`` (``datamodule.base_dir = out_dir``)::

    mels/track_0000.mmap ...           (frames, 96) float16 compressed log mels
    groundtruth-{train,validation,test,all}.pk   key "mels/track_0000.mmap" -> bool multi-hot
    labels.txt                         label names in vector order
    DONE.json                          written last; a rerun with equal parameters returns at once
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from helpers.files import write_text_atomic
from helpers.melfiles import save_groundtruth, write_mel
from models.mel import SAMPLE_RATE, MelSpectrogram

log = logging.getLogger(__name__)

VERSION = 1  # bump when the sounds change: DONE.json of an older version triggers regeneration
SPLITS = {"train": 0.70, "validation": 0.15, "test": 0.15}
LENGTH_RANGE = (0.8, 1.4)  # track length as a multiple of clip_length
EXTRA_LABELS_P = (0.4, 0.4, 0.2)  # probabilities of 0, 1, 2 labels beside the primary one
CHUNK = 16  # tracks per batched mel computation (fixed, so the numbers never depend on n_jobs)


# ---------------------------------------------------------------- synthesis (numpy, vectorised)


def _db(rng: np.random.Generator, low: float, high: float) -> float:
    return float(10 ** (rng.uniform(low, high) / 20))


def _periodic_time(rng: np.random.Generator, t: np.ndarray, period: float) -> np.ndarray:
    """Time since the last event of a train with ``period`` seconds and a random offset."""
    return np.mod(t - rng.uniform(0, period), period)


def _shaped_noise(rng: np.random.Generator, n: int, gain_of_hz) -> np.ndarray:
    """White noise filtered in the frequency domain by ``gain_of_hz(freqs)``, unit std."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=1 / SAMPLE_RATE)
    noise = np.fft.irfft(spectrum * gain_of_hz(freqs), n=n)
    return noise / (noise.std() + 1e-12)


def _sine(freq: float | np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))


def _chord(rng: np.random.Generator, t: np.ndarray, root_range: tuple[float, float], intervals) -> np.ndarray:
    root = rng.uniform(*root_range)
    notes = sum(_sine(root * 2 ** (k / 12), t, rng) * _db(rng, -3, 0) for k in intervals)
    since_strike = _periodic_time(rng, t, rng.uniform(1.5, 2.5))
    return notes * (0.4 + 0.6 * np.exp(-since_strike / 0.8)) / len(intervals) * 0.5


def _slow_rhythm(rng, t):
    tau = _periodic_time(rng, t, 60 / rng.uniform(50, 80))
    f_end, f_drop, t_drop = 45.0, 65.0, 0.04  # instantaneous freq 45 + 65 exp(-tau / 40 ms)
    phase = 2 * np.pi * (f_end * tau + f_drop * t_drop * (1 - np.exp(-tau / t_drop)))
    return 0.6 * np.sin(phase) * np.exp(-tau / 0.18)


def _low_tone(rng, t):
    return 0.25 * _sine(rng.uniform(140, 190), t, rng)


def _major_chord(rng, t):
    return _chord(rng, t, (262, 330), (0, 4, 7))


def _minor_chord(rng, t):
    return _chord(rng, t, (600, 700), (0, 3, 7))


def _vibrato(rng, t):
    carrier, rate, depth = rng.uniform(1500, 2000), rng.uniform(5, 7), 0.04
    phase = 2 * np.pi * carrier * t + depth * carrier / rate * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3))
    return 0.15 * np.sin(phase)


def _high_tone(rng, t):
    return 0.1 * _sine(rng.uniform(2800, 3400), t, rng)


def _sweep(rng, t):
    period, f0, f1 = rng.uniform(0.4, 0.8), 3800.0, 5200.0
    tau = _periodic_time(rng, t, period)
    ratio = f1 / f0
    phase = 2 * np.pi * f0 * period / np.log(ratio) * (ratio ** (tau / period) - 1)
    return 0.15 * np.sin(phase) * np.sin(np.pi * tau / period)  # fade in/out: no click at the wrap


def _fast_rhythm(rng, t):
    hiss = _shaped_noise(rng, t.size, lambda f: (f > 6000).astype(float))
    tau = _periodic_time(rng, t, 1 / rng.uniform(6, 8))
    return 0.15 * hiss * np.exp(-tau / 0.03)


def _white_noise(rng, t):
    return 0.03 * rng.standard_normal(t.size)


def _brown_noise(rng, t):
    return 0.1 * _shaped_noise(rng, t.size, lambda f: np.where(f > 20, 20 / np.maximum(f, 20), 0.0))


SOUNDS = {
    "slow rhythm": _slow_rhythm,
    "low tone": _low_tone,
    "major chord": _major_chord,
    "minor chord": _minor_chord,
    "vibrato": _vibrato,
    "high tone": _high_tone,
    "sweep": _sweep,
    "fast rhythm": _fast_rhythm,
    "white noise": _white_noise,
    "brown noise": _brown_noise,
}
LABELS = tuple(SOUNDS)  # the order of the multi-hot vectors and of labels.txt


def track_labels(seed: int, index: int) -> np.ndarray:
    """Multi-hot bool vector of track ``index``: label ``index % n`` plus 0-2 random others."""
    rng = np.random.default_rng([seed, index, 0])
    n = len(LABELS)
    primary = index % n
    n_extra = rng.choice(len(EXTRA_LABELS_P), p=EXTRA_LABELS_P)
    others = rng.choice([k for k in range(n) if k != primary], size=n_extra, replace=False)
    labels = np.zeros(n, dtype=bool)
    labels[[primary, *others]] = True
    return labels


def synthesize_track(seed: int, index: int, clip_length: float) -> np.ndarray:
    """Audio of track ``index`` at 16 kHz, float32, 0.8-1.4 x ``clip_length`` seconds long."""
    rng = np.random.default_rng([seed, index, 1])
    n = int(round(clip_length * rng.uniform(*LENGTH_RANGE) * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    labels = track_labels(seed, index)
    mix = sum(SOUNDS[LABELS[k]](rng, t) * _db(rng, -6, 0) for k in np.flatnonzero(labels))
    mix *= _db(rng, -6, 0)
    peak = np.abs(mix).max()
    if peak > 0.99:
        mix *= 0.99 / peak
    return mix.astype(np.float32)


# ---------------------------------------------------------------- files


def _key(index: int, n_tracks: int) -> str:
    return f"mels/track_{index:0{max(4, len(str(n_tracks - 1)))}d}.mmap"


def _write_chunk(out_dir: str, indices: list[int], *, n_tracks: int, seed: int, clip_length: float) -> None:
    """Synthesize ``indices``, compute their mels as one padded batch, write the mel files."""
    audio = [synthesize_track(seed, i, clip_length) for i in indices]
    batch = np.zeros((len(audio), max(a.size for a in audio)), dtype=np.float32)
    for row, a in zip(batch, audio):
        row[: a.size] = a  # zero padding = the STFT's own constant padding: frames are unchanged
    mel_module = MelSpectrogram()
    with torch.no_grad():
        mels = mel_module(torch.from_numpy(batch)).numpy()  # (B, 96, frames)
    for i, a, mel in zip(indices, audio, mels):
        write_mel(Path(out_dir) / _key(i, n_tracks), mel[:, : mel_module.n_frames(a.size)].T)


def _init_worker(n_threads: int) -> None:
    torch.set_num_threads(n_threads)


def _split(seed: int, n_tracks: int) -> dict[str, list[int]]:
    """70/15/15 split, stratified by primary label so every label is in every split."""
    rng = np.random.default_rng([seed, 2])
    splits = {name: [] for name in SPLITS}
    for primary in range(len(LABELS)):
        group = rng.permutation(np.arange(primary, n_tracks, len(LABELS)))
        n_val = max(1, int(round(SPLITS["validation"] * group.size)))
        n_test = max(1, int(round(SPLITS["test"] * group.size)))
        splits["validation"] += group[:n_val].tolist()
        splits["test"] += group[n_val : n_val + n_test].tolist()
        splits["train"] += group[n_val + n_test :].tolist()
    return {name: sorted(idx) for name, idx in splits.items()}


def _paths(out_dir: Path) -> dict:
    return {
        "base_dir": str(out_dir),
        "groundtruth_train": str(out_dir / "groundtruth-train.pk"),
        "groundtruth_val": str(out_dir / "groundtruth-validation.pk"),
        "groundtruth_test": str(out_dir / "groundtruth-test.pk"),
        "groundtruth_all": str(out_dir / "groundtruth-all.pk"),
        "labels_path": str(out_dir / "labels.txt"),
        "labels": list(LABELS),
        "n_classes": len(LABELS),
    }


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_tracks: int = 300,
    clip_length: float = 10.0,
    seed: int = 0,
    n_jobs: int = 1,
) -> dict:
    """Generate the synthetic dataset under ``out_dir`` once; return its paths.

    Returns ``base_dir``, ``groundtruth_{train,val,test,all}``, ``labels_path``, ``labels`` and
    ``n_classes``. If ``out_dir/DONE.json`` records the same parameters nothing is generated;
    otherwise (absent, other parameters, or a run that stopped half-way) everything is rewritten.
    """
    out_dir = Path(out_dir)
    if n_tracks < 3 * len(LABELS):
        raise ValueError(
            f"n_tracks={n_tracks} is too small: every one of the {len(LABELS)} labels must be in "
            f"train, validation and test, so use n_tracks >= {3 * len(LABELS)}"
        )
    if clip_length <= 0:
        raise ValueError(f"clip_length must be positive seconds, got {clip_length}")
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    paths = _paths(out_dir)
    params = {
        "version": VERSION,
        "n_tracks": n_tracks,
        "clip_length": float(clip_length),
        "seed": seed,
        "sample_rate": SAMPLE_RATE,
        "labels": list(LABELS),
    }
    done = out_dir / "DONE.json"
    if done.is_file():
        try:
            recorded = json.loads(done.read_text())
        except json.JSONDecodeError:
            recorded = None
        if recorded == params and all(
            Path(paths[k]).is_file() for k in ("groundtruth_train", "groundtruth_val", "groundtruth_test", "labels_path")
        ):
            log.info("synthetic dataset in %s is complete (DONE.json): not regenerating", out_dir)
            return paths
        log.info("synthetic dataset in %s was made with other parameters: regenerating", out_dir)
    done.unlink(missing_ok=True)
    for stale in (out_dir / "mels").glob("track_*.mmap"):
        stale.unlink()

    log.info("generating %d synthetic tracks in %s (%d job(s))", n_tracks, out_dir, n_jobs)
    chunks = [list(range(i, min(i + CHUNK, n_tracks))) for i in range(0, n_tracks, CHUNK)]
    write_chunk = functools.partial(
        _write_chunk, str(out_dir), n_tracks=n_tracks, seed=seed, clip_length=float(clip_length)
    )
    if n_jobs == 1:
        for chunk in chunks:
            write_chunk(chunk)
    else:
        # spawn, not fork: forking a process whose torch thread pool has run can deadlock. As with
        # any spawn pool, a calling script needs the `if __name__ == "__main__":` guard.
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(n_jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            list(pool.map(write_chunk, chunks))  # list(): re-raises a worker's exception here

    gt_all = {_key(i, n_tracks): track_labels(seed, i) for i in range(n_tracks)}
    for name, indices in _split(seed, n_tracks).items():
        key = {"validation": "groundtruth_val"}.get(name, f"groundtruth_{name}")
        save_groundtruth(paths[key], {_key(i, n_tracks): gt_all[_key(i, n_tracks)] for i in indices})
    save_groundtruth(paths["groundtruth_all"], gt_all)
    Path(paths["labels_path"]).write_text("\n".join(LABELS) + "\n")
    write_text_atomic(done, json.dumps(params, indent=2) + "\n")
    return paths
