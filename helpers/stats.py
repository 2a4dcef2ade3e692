"""Normalisation statistics of stored mel spectrograms (``compute_norm_stats``)."""

from __future__ import annotations

import logging
import os

import numpy as np
from tqdm.auto import tqdm

from .failures import update_failure_list
from .melfiles import MelFileError, MelReader, load_groundtruth

_logger = logging.getLogger(__name__)


def mel_statistics(
    base_dir: str | os.PathLike,
    groundtruth: str | os.PathLike,
    progress: bool = True,
    failed_list: str | os.PathLike | None = None,
) -> dict:
    """Mean and standard deviation of every (compressed, unnormalised) mel value of the listed files.

    Streams each file once in float64 sums, so it works on datasets larger than memory. A file
    that cannot be read (missing, truncated, NaN, integer-typed) is left out of the statistics
    and listed in ``failed`` (key -> reason), not fatal; with ``failed_list``, the failures are
    merged into that file (``helpers.failures``), also when no file could be read.
    """
    reader = MelReader(base_dir)
    total = total_sq = 0.0
    n_values = n_frames = 0
    failed: dict[str, str] = {}
    keys = list(load_groundtruth(groundtruth))
    for key in tqdm(keys, desc="norm stats", unit="file", disable=not progress):
        try:
            mel = reader.read(key).astype(np.float64)
        except (MelFileError, OSError, ValueError) as e:
            _logger.debug("skipping %s: %s", key, e)  # the command lists it (FAILED line, failure list)
            failed[key] = str(e)
            continue
        total += mel.sum()
        total_sq += np.square(mel).sum()
        n_values += mel.size
        n_frames += mel.shape[0]
    if failed_list is not None:
        update_failure_list(failed_list, failed, succeeded=[k for k in keys if k not in failed])
    if not n_values:
        raise ValueError(
            f"none of the {len(keys)} mel files of {groundtruth} under {base_dir} could be read, e.g. "
            + "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:3])
        )
    mean = total / n_values
    std = float(np.sqrt(max(total_sq / n_values - mean**2, 0.0)))
    n_files = len(keys) - len(failed)
    return {"mean": float(mean), "std": std, "n_frames": int(n_frames), "n_files": n_files, "failed": failed}
