"""Normalisation statistics of stored mel spectrograms (``compute_norm_stats``)."""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from .melfiles import MelFileError, MelReader, load_groundtruth


def mel_statistics(base_dir: str | os.PathLike, groundtruth: str | os.PathLike, progress: bool = True) -> dict:
    """Mean and standard deviation of every (compressed, unnormalised) mel value of the listed files.

    Streams each file once in float64 sums, so it works on datasets larger than memory; unreadable
    files are counted and listed, not fatal.
    """
    reader = MelReader(base_dir)
    total = total_sq = 0.0
    n_values = n_frames = 0
    failed = []
    keys = list(load_groundtruth(groundtruth))
    for key in tqdm(keys, desc="norm stats", unit="file", disable=not progress):
        try:
            mel = reader.read(key).astype(np.float64)
        except MelFileError as e:
            failed.append(f"{key}: {e}")
            continue
        total += mel.sum()
        total_sq += np.square(mel).sum()
        n_values += mel.size
        n_frames += mel.shape[0]
    if not n_values:
        raise ValueError(f"no readable mel files among the keys of {groundtruth} under {base_dir}")
    mean = total / n_values
    std = float(np.sqrt(max(total_sq / n_values - mean**2, 0.0)))
    n_files = len(keys) - len(failed)
    return {"mean": float(mean), "std": std, "n_frames": int(n_frames), "n_files": n_files, "failed": failed}
