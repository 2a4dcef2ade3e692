"""GTZAN genres, fault-filtered split: download, unpack and extract the mels that ``target_gtzan`` reads (SPEC §3).

    python -m datasets.gtzan.preprocess all      [--archive F] [--download-dir D] [--audio-dir A] [--out-dir O] [--jobs N]
    python -m datasets.gtzan.preprocess download [--download-dir D]
    python -m datasets.gtzan.preprocess unpack   [--archive F] [--download-dir D] [--audio-dir A]
    python -m datasets.gtzan.preprocess extract  [--audio-dir A] [--out-dir O] [--jobs N]

- ``download``: ``genres.tar.gz`` (1.2 GB) from the Hugging Face mirror of Marsyas' archive
  (``marsyas/gtzan``; the original host opihi.cs.uvic.ca is gone), resuming a partial download,
  with a progress bar, then its SHA-256 checked;
- ``unpack``: the 1000 excerpts ``<genre>/<genre>.000NN.wav`` (or ``.au``) of the archive
  (``--archive F``: a copy you have, a tar or zip such as Kaggle's, in which any folder may hold
  the genre folders) into ``--audio-dir``, skipping files already there and anything else in the
  archive (macOS ``._*`` files, Kaggle's images and CSVs); it logs the suffix of the excerpts it
  found (``extract`` takes whichever the folder holds, ``--audio-suffix`` names one);
- ``extract``: the mel of every track of the shipped split (``datasets/gtzan/*_filtered.txt``:
  443 train, 197 validation, 290 test tracks, Kereliuk et al. 2015) from
  ``<audio_dir>/<genre>/<genre>.000NN.wav`` to ``<out_dir>/<genre>/<genre>.000NN.mmap``, in
  parallel and resumable, resampled to 16 kHz as every mel of the project. Unreadable tracks are
  listed in ``<out_dir>/failed.txt`` (``jazz/jazz.00054.wav`` is damaged in Kaggle's copy, and
  reported so for the Hugging Face one; the list holds only tracks of this run's split and
  ``--audio-suffix``) and the command exits with status 1. It then writes the ground truth of the
  tracks whose mel exists next to the mels: ``groundtruth-{train,validation,test,all}.pk``, one-hot
  float32 vectors over the genres in the order of ``genres.txt`` (copied there too). Ctrl-C stops
  it with one line saying how far it got (exit status 130); the same command resumes.

Then run ``python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_gtzan`` and
``python ex_tl.py with target_gtzan_tl`` (with another ``--out-dir``, ``extract`` prints the
settings to add).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from datasets.mtt.preprocess import MTTError, download_file, next_commands
from datasets.prepare_folder import NothingPrepared, extract_mel_files, interrupted_message, report_nothing_prepared, write_failed_list
from helpers.failures import format_failures, read_failure_list
from helpers.files import atomic_path
from helpers.melfiles import save_groundtruth

log = logging.getLogger(__name__)

URL = "https://huggingface.co/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz"
SHA256 = "b28cc067ff6199bd826f5d1a6931458586d64acae7f44b2e882b7a97af057531"  # of the archive at URL
KNOWN_ARCHIVES = {  # SHA-256 -> which copy of GTZAN it is (unpack --archive names a known one in the log)
    SHA256: "the Hugging Face mirror marsyas/gtzan (data/genres.tar.gz)",
    "24347e0223d2ba798e0a558c4c172d9d4a19c00bb7963fe055d183dadb4ef2c6": "Marsyas' genres.tar.gz (opihi.cs.uvic.ca)",
}
SHIPPED_DIR = Path(__file__).resolve().parent  # the split files and genres.txt that come with the code
SPLIT_FILES = {"train": "train_filtered.txt", "validation": "valid_filtered.txt", "test": "test_filtered.txt"}
GENRES_FILE = "genres.txt"
# An excerpt in an archive: <genre>/<genre>.000NN.wav under any folder (genres/ in Marsyas', Data/genres_original/ in Kaggle's).
AUDIO_MEMBER = re.compile(r"(?:^|/)(?P<genre>[a-z]+)/(?P=genre)\.(?P<number>\d{5})\.(?P<suffix>wav|au)$")
SPLIT_LINE = re.compile(r"(?P<genre>[a-z]+)/(?P=genre)\.\d{5}\.wav")

DEFAULT_DOWNLOAD_DIR = Path("data/gtzan/archive")
DEFAULT_AUDIO_DIR = Path("data/gtzan/audio")
DEFAULT_OUT_DIR = Path("data/gtzan/mels")
CHUNK_BYTES = 1 << 20
OTHER_SUFFIX = {".wav": ".au", ".au": ".wav"}  # the two formats GTZAN's copies come in


class GTZANError(RuntimeError):
    """A download, archive or split problem; the message says which file and what to do."""


def read_genres(split_dir: Path = SHIPPED_DIR) -> list[str]:
    """The genre names in label-vector order (``genres.txt``)."""
    path = Path(split_dir) / GENRES_FILE
    if not path.is_file():
        raise GTZANError(f"{path} does not exist: --split-dir must hold genres.txt and the three *_filtered.txt files")
    return path.read_text().split()


# ---------------------------------------------------------------- download


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"SHA-256 {path.name}", disable=None
    ) as bar:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_archive(path: Path, sha256: str | None = None) -> str:
    """The archive's SHA-256, which must equal ``sha256`` when given (a download); else it is only named."""
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        raise GTZANError(
            f"{path} has SHA-256 {digest}, expected {sha256}: the download is damaged or the mirror changed; "
            f"delete {path} and run download again, or unpack a copy you trust with --archive "
            "(--sha256 '' skips this check)"
        )
    if digest in KNOWN_ARCHIVES:
        log.info("%s is %s (SHA-256 verified)", path, KNOWN_ARCHIVES[digest])
    else:
        log.warning(
            "%s (SHA-256 %s) is not one of the known GTZAN archives: unpacking it anyway; every track is still "
            "checked when its mel is extracted", path, digest,
        )
    return digest


def download(download_dir: Path = DEFAULT_DOWNLOAD_DIR, url: str = URL, sha256: str | None = SHA256) -> Path:
    """The archive in ``download_dir`` (downloaded where missing), its SHA-256 checked against ``sha256``."""
    dest = Path(download_dir) / url.rsplit("/", 1)[-1]
    download_file(url, dest)
    check_archive(dest, sha256)
    return dest


# ---------------------------------------------------------------- unpack


def _members(archive: Path) -> Iterator[tuple[str, int, Callable[[], BinaryIO]]]:
    """``(name, size, open)`` of the regular files of a tar (any compression) or zip, in archive order."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, lambda info=info: z.open(info)
        return
    with tarfile.open(archive, "r:*") as tar:  # read in order: a .tar.gz is decompressed once
        for member in tar:
            if member.isfile():
                yield member.name, member.size, lambda member=member: tar.extractfile(member)


def missing_archive(archive: Path) -> GTZANError:
    """The error for an ``--archive`` path that is not a file (said before its SHA-256 is computed)."""
    return GTZANError(
        f"--archive {archive}: no such file; give the path of your copy of GTZAN (a tar or zip archive), "
        "or leave --archive out to download the Hugging Face mirror's copy"
    )


def unpack(
    archive: Path, audio_dir: Path = DEFAULT_AUDIO_DIR, genres: Sequence[str] | None = None, user_copy: bool = False
) -> int:
    """Extract the excerpts of ``genres`` in ``archive`` to ``audio_dir/<genre>/<file>``; returns the files written.

    Files already present with the right size are skipped; each file is written under a temporary
    name and renamed, so an interrupted unpack leaves no truncated wav. Destinations are built from
    the genre and number only, so no archive member can write outside ``audio_dir``. ``user_copy``:
    the archive is a copy given with ``--archive``, not the download (the errors say what to do
    for each). The suffix of the excerpts (``.wav`` or ``.au``) is logged: ``extract`` needs it.
    """
    archive, audio_dir = Path(archive), Path(audio_dir)
    if not archive.is_file():
        if user_copy:
            raise missing_archive(archive)
        raise GTZANError(f"archive {archive} does not exist: run the download command first, or pass --archive")
    genres = set(read_genres() if genres is None else genres)
    written = found = ignored = 0
    suffixes: Counter[str] = Counter()
    try:
        for name, size, open_member in tqdm(_members(archive), desc="unpack", unit="file", disable=None):
            match = AUDIO_MEMBER.search(name)
            if match is None or match["genre"] not in genres:
                ignored += 1
                continue
            found += 1
            suffixes[f".{match['suffix']}"] += 1
            dest = audio_dir / match["genre"] / f"{match['genre']}.{match['number']}.{match['suffix']}"
            if dest.is_file() and dest.stat().st_size == size:
                continue
            with atomic_path(dest) as tmp, open_member() as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK_BYTES)
            written += 1
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as e:
        problem = f"{archive} is damaged or not a tar/zip archive ({type(e).__name__}: {e})"
        if user_copy:  # the user's own file: nothing of ours to delete or download again
            raise GTZANError(
                f"{problem}. It is the copy given with --archive: check it (is its download complete? does your "
                "archive tool open it?) and pass a sound copy, or leave --archive out to download the Hugging Face "
                f"mirror's copy. The excerpts unpacked before the damaged one are complete and kept in {audio_dir}"
            ) from e
        raise GTZANError(f"{problem}; delete it and run download again, or pass another copy with --archive") from e
    if not found:
        raise GTZANError(
            f"{archive} holds no GTZAN excerpt (<genre>/<genre>.000NN.wav or .au of the genres in genres.txt): "
            "is it the GTZAN archive?"
        )
    kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(suffixes.items()))
    log.info(
        "unpacked %d file(s) into %s (%s excerpts; %d already there, %d other member(s) ignored)",
        written, audio_dir, kinds, found - written, ignored,
    )
    if ".wav" not in suffixes:
        log.info("the excerpts are .au files: extract takes them as they are (--audio-suffix .au)")
    return written


# ---------------------------------------------------------------- extract


def load_split(split_dir: Path = SHIPPED_DIR) -> dict[str, list[str]]:
    """``{split: [<genre>/<genre>.000NN.wav, ...]}`` for train/validation/test, checked: known genres, disjoint."""
    split_dir = Path(split_dir)
    genres = set(read_genres(split_dir))
    splits: dict[str, list[str]] = {}
    for split, filename in SPLIT_FILES.items():
        path = split_dir / filename
        if not path.is_file():
            raise GTZANError(f"split file {path} does not exist: --split-dir must hold the three *_filtered.txt files")
        tracks = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for number, track in enumerate(tracks, 1):
            match = SPLIT_LINE.fullmatch(track)
            if match is None or match["genre"] not in genres:
                raise GTZANError(
                    f"{path} line {number}: {track!r} is not <genre>/<genre>.000NN.wav with a genre of {split_dir / GENRES_FILE}"
                )
        if len(set(tracks)) != len(tracks):
            raise GTZANError(f"{path} lists a track twice: the split file is damaged")
        splits[split] = tracks
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(splits[a]) & set(splits[b])
            if shared:
                raise GTZANError(
                    f"{len(shared)} track(s) are in both the {a} and the {b} split of {split_dir} "
                    f"(e.g. {sorted(shared)[0]}): the split files are damaged"
                )
    return splits


def mel_key(track: str) -> str:
    """``blues/blues.00029.wav`` -> ``blues/blues.00029.mmap`` (the ground-truth key)."""
    return PurePosixPath(track).with_suffix(".mmap").as_posix()


def _suffix(text: str) -> str:
    """``--audio-suffix``: ``.au`` or ``au`` (the dot added), one file suffix."""
    suffix = text if text.startswith(".") else f".{text}"
    if len(suffix) < 2 or "/" in suffix or suffix.count(".") != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file suffix: give one such as .wav or .au")
    return suffix


def detect_audio_suffix(tracks: Sequence[str], audio_dir: Path) -> str:
    """The suffix the split's tracks have in ``audio_dir``: ``.wav`` where any is there, else ``.au``
    where any is (copies of Marsyas' archive), else ``.wav`` (every track then fails as missing)."""
    for suffix in (".wav", ".au"):
        if any((audio_dir / track).with_suffix(suffix).is_file() for track in tracks):
            if suffix != ".wav":
                log.info("%s holds the excerpts as %s files: extracting those (--audio-suffix names another)", audio_dir, suffix)
            return suffix
    return ".wav"


def check_audio_suffix(audio_files: Sequence[Path], audio_dir: Path, audio_suffix: str) -> None:
    """Refuse, before any work, a folder holding none of ``audio_files`` but the tracks in the other format.

    GTZAN's copies differ: Kaggle's holds ``.wav`` files, copies of Marsyas' archive may hold ``.au`` ones.
    """
    other = OTHER_SUFFIX.get(audio_suffix.lower())
    if other is None or any(audio.is_file() for audio in audio_files):
        return
    there = [audio.with_suffix(other) for audio in audio_files if audio.with_suffix(other).is_file()]
    if there:
        raise GTZANError(
            f"{audio_dir} holds no track of the split as {audio_suffix} but {len(there)} as {other} (e.g. "
            f"{there[0].relative_to(audio_dir).as_posix()}): pass --audio-suffix {other}"
        )


def one_hot(genre: str, genres: Sequence[str]) -> np.ndarray:
    vector = np.zeros(len(genres), dtype=np.float32)  # (n_genres,)
    vector[list(genres).index(genre)] = 1.0
    return vector


def extract(
    audio_dir: Path = DEFAULT_AUDIO_DIR,
    out_dir: Path = DEFAULT_OUT_DIR,
    jobs: int = 1,
    split_dir: Path = SHIPPED_DIR,
    audio_suffix: str | None = None,
) -> dict[str, Path]:
    """Mels of every track of the split under ``out_dir``, and ground truth next to them.

    ``audio_suffix``: the excerpts' suffix; None: the one the folder holds (``detect_audio_suffix``).

    Returns ``{split: path}`` of the ground truth (``train``, ``validation``, ``test``, ``all``),
    which holds only the tracks whose mel exists; ``out_dir/failed.txt`` lists the rest.
    """
    audio_dir, out_dir, split_dir = Path(audio_dir), Path(out_dir), Path(split_dir)
    genres = read_genres(split_dir)
    splits = load_split(split_dir)
    if not audio_dir.is_dir():
        raise GTZANError(f"audio folder {audio_dir} does not exist: run the unpack command first (or pass --audio-dir)")
    tracks = sorted(t for split in splits.values() for t in split)
    audio_suffix = audio_suffix or detect_audio_suffix(tracks, audio_dir)
    tasks = [(audio_dir / Path(track).with_suffix(audio_suffix), out_dir / mel_key(track)) for track in tracks]
    check_audio_suffix([audio for audio, _ in tasks], audio_dir, audio_suffix)
    result = extract_mel_files(tasks, n_jobs=jobs, desc="GTZAN mels")
    other = OTHER_SUFFIX.get(audio_suffix.lower())
    for audio in result.failed:  # a folder of both kinds: say which failed track has the other kind
        if other is not None and audio.with_suffix(other).is_file():
            result.failed[audio] += f"; {audio.with_suffix(other).name} is there: pass --audio-suffix {other} if that is your copy"
    audio_files = [audio for audio, _ in tasks]
    write_failed_list(
        out_dir, result.failed, relative_to=audio_dir,
        succeeded=[a for a in audio_files if a not in result.failed], covered=audio_files,
    )

    have_mel = set(result.written) | set(result.skipped)
    present = {t for t, (_, mel) in zip(tracks, tasks) if mel in have_mel}
    if len(present) < len(tracks):
        log.warning(
            "%d of %d tracks have no mel (see %s): the ground truth in %s leaves them out",
            len(tracks) - len(present), len(tracks), out_dir / "failed.txt", out_dir,
        )
    paths, everything = {}, {}
    for split, split_tracks in splits.items():
        gt = {mel_key(t): one_hot(t.split("/")[0], genres) for t in split_tracks if t in present}
        if not gt:
            raise NothingPrepared(
                f"no track of the {split} split has a mel in {out_dir}: check --audio-dir and {out_dir / 'failed.txt'}",
                out_dir / "failed.txt",
            )
        paths[split] = save_groundtruth(out_dir / f"groundtruth-{split}.pk", gt)
        everything.update(gt)
    paths["all"] = save_groundtruth(out_dir / "groundtruth-all.pk", everything)
    shutil.copyfile(split_dir / GENRES_FILE, out_dir / GENRES_FILE)
    log.info(
        "GTZAN mels in %s: %d written, %d already there, %d failed",
        out_dir, len(result.written), len(result.skipped), len(result.failed),
    )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.gtzan.preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("download", "unpack", "extract", "all"))
    parser.add_argument("--archive", type=Path, help="unpack this copy of GTZAN (tar or zip) instead of downloading")
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR, help="where genres.tar.gz goes")
    parser.add_argument("--url", default=URL, help="where to download the archive from (default: the Hugging Face mirror)")
    parser.add_argument("--sha256", default=SHA256, help="SHA-256 the download must have ('' to skip the check)")
    parser.add_argument("--audio-dir", type=Path, default=DEFAULT_AUDIO_DIR, help="where the wav files go")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the mels go (datamodule.base_dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes for extract")
    parser.add_argument(
        "--audio-suffix", default=None, type=_suffix,
        help="suffix of the audio files (default: .wav, or .au where the folder holds only those; au and .au are one)",
    )
    parser.add_argument(
        "--split-dir", type=Path, default=SHIPPED_DIR, help="folder of the *_filtered.txt files and genres.txt (default: shipped)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        archive = args.archive
        if args.command in ("download", "all") and archive is None:
            archive = download(args.download_dir, args.url, args.sha256 or None)
        if args.command in ("unpack", "all"):
            if args.archive is None:
                archive = args.download_dir / args.url.rsplit("/", 1)[-1]
            else:
                if not archive.is_file():
                    raise missing_archive(archive)
                check_archive(archive)  # names the copy; an unknown one is only a warning
            unpack(archive, args.audio_dir, read_genres(args.split_dir), user_copy=args.archive is not None)
        if args.command in ("extract", "all"):
            extract(args.audio_dir, args.out_dir, jobs=args.jobs, split_dir=args.split_dir, audio_suffix=args.audio_suffix)
            log.info("next: %s", next_commands(args.out_dir, "target_gtzan", DEFAULT_OUT_DIR))
            # failed.txt holds the failures of this run's tracks only (covered): earlier suffixes or splits are gone
            failed = read_failure_list(args.out_dir / "failed.txt")
            if failed:  # SPEC §8: the other tracks are prepared; the missing ones are listed and the command fails
                print(format_failures(failed, args.out_dir / "failed.txt", "audio file"), file=sys.stderr)
                return 1
    except NothingPrepared as e:  # the error, then each file's FAILED line
        return report_nothing_prepared(e)
    except (GTZANError, MTTError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not the traceback of the process pool
        print(interrupted_message(e), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
