"""MagnaTagATune: download, unpack and extract the mels that ``target_mtt`` reads (SPEC §3).

    python -m datasets.mtt.preprocess all      [--download-dir D] [--audio-dir A] [--out-dir O] [--jobs N]
    python -m datasets.mtt.preprocess download [--download-dir D]
    python -m datasets.mtt.preprocess unpack   [--download-dir D] [--audio-dir A]
    python -m datasets.mtt.preprocess extract  [--audio-dir A] [--out-dir O] [--jobs N]

- ``download``: the three parts of the mp3 zip (about 3 GB) from the MIRG server, resuming
  partial downloads (``<part>.partial``), with a progress bar;
- ``unpack``: reads the parts as one zip without joining them on disk and extracts the mp3 files
  into ``--audio-dir`` (``<audio_dir>/0/<track>-0-29.mp3`` ...), skipping files already there; a
  damaged part is named (delete it and download again);
- ``extract``: the mel of every clip in the shipped ground truth (``datasets/mtt/groundtruth-*.pk``,
  keys like ``0/<track>-0-29.mmap``) from ``<audio_dir>/0/<track>-0-29.mp3`` to ``<out_dir>/<key>``,
  in parallel and resumable; unreadable clips are listed in ``<out_dir>/failed.txt`` (only clips
  of this run's ground truth and ``--audio-suffix``) and the command exits with status 1. It then
  checks the ground truth (50 tags, disjoint splits) and writes copies of it next to the mels,
  holding only the clips whose mel exists, with ``tags.txt``. Ctrl-C stops it with one line saying
  how far it got (exit status 130); the same command resumes.

Then run ``python ex_maest.py extract_embeddings with maest_30s_from_passt_infer target_mtt`` and
``python ex_tl.py with target_mtt_tl``: both read the copies of the ground truth in ``data/mtt/mels``
(with another ``--out-dir``, ``extract`` prints the settings to add).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shlex
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from datasets.prepare_folder import NothingPrepared, extract_mel_files, interrupted_message, report_nothing_prepared, write_failed_list
from helpers.failures import format_failures, read_failure_list
from helpers.files import atomic_path
from helpers.melfiles import load_groundtruth, save_groundtruth

log = logging.getLogger(__name__)

BASE_URL = "https://mirg.city.ac.uk/datasets/magnatagatune/"
PART_NAMES = ("mp3.zip.001", "mp3.zip.002", "mp3.zip.003")
URLS = tuple(BASE_URL + name for name in PART_NAMES)
SHIPPED_DIR = Path(__file__).resolve().parent  # the ground truth and tags.txt that come with the code
SPLITS = ("train", "validation", "test")
N_TAGS = 50

DEFAULT_DOWNLOAD_DIR = Path("data/mtt/zip")
DEFAULT_AUDIO_DIR = Path("data/mtt/audio")
DEFAULT_OUT_DIR = Path("data/mtt/mels")
CHUNK_BYTES = 1 << 20


class MTTError(RuntimeError):
    """A download, archive or ground-truth problem; the message says which file and what to do."""


# ---------------------------------------------------------------- download


def download_file(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.partial``, resuming a partial file (HTTP Range)."""
    if dest.is_file():
        log.info("%s is already downloaded", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the partial file is complete
            os.replace(partial, dest)
            return dest
        raise MTTError(f"downloading {url} failed: HTTP {e.code} {e.reason}; try again later") from e
    except urllib.error.URLError as e:
        raise MTTError(f"cannot reach {url} ({e.reason}); check the network and run download again") from e
    with response:
        if have and response.status != 206:
            log.info("%s does not resume downloads: starting %s again", url, dest.name)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(partial, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
    got = partial.stat().st_size
    if total is not None and got != total:
        raise MTTError(f"download of {url} stopped at {got} of {total} bytes; run download again to resume")
    os.replace(partial, dest)
    return dest


def download(download_dir: Path = DEFAULT_DOWNLOAD_DIR, urls: Sequence[str] = URLS) -> list[Path]:
    """The zip parts in ``download_dir`` (downloaded where missing)."""
    return [download_file(url, Path(download_dir) / url.rsplit("/", 1)[-1]) for url in urls]


# ---------------------------------------------------------------- unpack


class ConcatenatedFile(io.RawIOBase):
    """The byte-wise concatenation of files, read-only and seekable: a split zip read as one."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)]).tolist()
        self._pos = 0

    @property
    def size(self) -> int:
        return self._starts[-1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:  # OSError, as for a real file: zipfile relies on it for tiny files
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self.size:
            part = int(np.searchsorted(self._starts, self._pos, side="right")) - 1
            f = self._files[part]
            f.seek(self._pos - self._starts[part])
            n = f.readinto(view[done : done + min(len(view) - done, self._starts[part + 1] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _safe_member_path(audio_dir: Path, name: str) -> Path:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise MTTError(f"refusing to extract {name!r}: the archive member points outside {audio_dir}")
    return audio_dir.joinpath(*rel.parts)


def unpack(
    download_dir: Path = DEFAULT_DOWNLOAD_DIR, audio_dir: Path = DEFAULT_AUDIO_DIR, part_names: Sequence[str] = PART_NAMES
) -> int:
    """Extract the split zip in ``download_dir`` into ``audio_dir``; returns the files written.

    Members already present with the right size are skipped; each file is written under a
    temporary name and renamed, so an interrupted unpack leaves no truncated mp3 (nor a temporary
    file). A member that fails its CRC check names the part(s) holding its bytes.
    """
    download_dir, audio_dir = Path(download_dir), Path(audio_dir)
    parts = [download_dir / name for name in part_names]
    missing = [p for p in parts if not p.is_file()]
    if missing:
        raise MTTError(f"zip part(s) {', '.join(map(str, missing))} missing: run the download command first")
    written = 0
    with io.BufferedReader(ConcatenatedFile(parts), buffer_size=CHUNK_BYTES) as stream:
        try:
            archive = zipfile.ZipFile(stream)
        except zipfile.BadZipFile as e:
            raise MTTError(
                f"the parts {', '.join(part_names)} in {download_dir} are not a valid zip ({e}): "
                "delete the damaged part and download again"
            ) from e
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            for member in tqdm(members, desc="unpack", unit="file", disable=None):
                dest = _safe_member_path(audio_dir, member.filename)
                if dest.is_file() and dest.stat().st_size == member.file_size:
                    continue
                try:
                    with atomic_path(dest) as tmp, archive.open(member) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK_BYTES)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    damaged = _parts_holding(archive, member, parts)
                    raise MTTError(
                        f"{member.filename} in the zip is damaged ({type(e).__name__}: {e}); its bytes are in "
                        f"{' and '.join(map(str, damaged))}: delete {'them' if len(damaged) > 1 else 'it'}, run download "
                        "again, then unpack (the files unpacked before it are complete and kept)"
                    ) from e
                written += 1
    log.info("unpacked %d file(s) into %s (%d already there)", written, audio_dir, len(members) - written)
    return written


def _parts_holding(archive: zipfile.ZipFile, member: zipfile.ZipInfo, parts: Sequence[Path]) -> list[Path]:
    """The zip parts that hold ``member``'s bytes: from its local header to the next member's (or the directory)."""
    after = sorted(m.header_offset for m in archive.infolist() if m.header_offset > member.header_offset)
    end = after[0] if after else getattr(archive, "start_dir", sum(p.stat().st_size for p in parts))
    held, start = [], 0
    for part in parts:
        size = part.stat().st_size
        if start < end and member.header_offset < start + size:
            held.append(part)
        start += size
    return held or list(parts)


# ---------------------------------------------------------------- extract


def load_shipped_groundtruth(groundtruth_dir: Path = SHIPPED_DIR) -> dict[str, dict[str, np.ndarray]]:
    """``{split: ground truth}`` for train/validation/test, checked: 50 tags, disjoint splits."""
    tags = (groundtruth_dir / "tags.txt").read_text().split("\n")
    n_tags = len([t for t in tags if t.strip()])
    gts = {split: load_groundtruth(groundtruth_dir / f"groundtruth-{split}.pk") for split in SPLITS}
    for split, gt in gts.items():
        length = len(next(iter(gt.values())))
        if length != n_tags:
            raise MTTError(
                f"{groundtruth_dir / f'groundtruth-{split}.pk'} has {length}-tag vectors but tags.txt lists "
                f"{n_tags} tags: the ground truth does not belong to this tag list"
            )
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = gts[a].keys() & gts[b].keys()
            if shared:
                raise MTTError(
                    f"{len(shared)} clip(s) are in both the {a} and the {b} split of {groundtruth_dir} "
                    f"(e.g. {sorted(shared)[0]}): the ground truth is damaged"
                )
    return gts


def extract(
    audio_dir: Path = DEFAULT_AUDIO_DIR,
    out_dir: Path = DEFAULT_OUT_DIR,
    jobs: int = 1,
    groundtruth_dir: Path = SHIPPED_DIR,
    audio_suffix: str = ".mp3",
) -> dict[str, Path]:
    """Mels of every ground-truth clip under ``out_dir``, and ground truth copies next to them.

    Returns ``{split: path}`` of the copied ground truth (``train``, ``validation``, ``test``,
    ``all``), which hold only the clips whose mel exists; ``out_dir/failed.txt`` lists the rest.
    """
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    gts = load_shipped_groundtruth(Path(groundtruth_dir))
    keys = sorted(k for gt in gts.values() for k in gt)
    if not audio_dir.is_dir():
        raise MTTError(f"audio folder {audio_dir} does not exist: run the unpack command first (or pass --audio-dir)")
    tasks = [(audio_dir / Path(key).with_suffix(audio_suffix), out_dir / key) for key in keys]
    result = extract_mel_files(tasks, n_jobs=jobs, desc="MTT mels")
    audio_files = [audio for audio, _ in tasks]
    write_failed_list(
        out_dir, result.failed, relative_to=audio_dir,
        succeeded=[a for a in audio_files if a not in result.failed], covered=audio_files,
    )

    have_mel = set(result.written) | set(result.skipped)
    present = {key for key in keys if out_dir / key in have_mel}
    if len(present) < len(keys):
        log.warning(
            "%d of %d clips have no mel (see %s): the ground truth copies in %s leave them out",
            len(keys) - len(present), len(keys), out_dir / "failed.txt", out_dir,
        )
    paths = {}
    kept_all = {}
    for split, gt in gts.items():
        kept = {k: v for k, v in gt.items() if k in present}
        if not kept:
            raise NothingPrepared(
                f"no clip of the {split} split has a mel in {out_dir}: check --audio-dir and {out_dir / 'failed.txt'}",
                out_dir / "failed.txt",
            )
        paths[split] = save_groundtruth(out_dir / f"groundtruth-{split}.pk", kept)
        kept_all.update(kept)
    paths["all"] = save_groundtruth(out_dir / "groundtruth-all.pk", kept_all)
    shutil.copyfile(Path(groundtruth_dir) / "tags.txt", out_dir / "tags.txt")
    log.info(
        "MTT mels in %s: %d written, %d already there, %d failed",
        out_dir, len(result.written), len(result.skipped), len(result.failed),
    )
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datasets.mtt.preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("download", "unpack", "extract", "all"))
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR, help="where the zip parts go")
    parser.add_argument("--audio-dir", type=Path, default=DEFAULT_AUDIO_DIR, help="where the mp3 files go")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the mels go (datamodule.base_dir)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes for extract")
    parser.add_argument("--audio-suffix", default=".mp3", help="suffix of the audio files (default .mp3)")
    parser.add_argument(
        "--groundtruth-dir", type=Path, default=SHIPPED_DIR, help="folder of groundtruth-*.pk and tags.txt (default: shipped)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("download", "all"):
            download(args.download_dir)
        if args.command in ("unpack", "all"):
            unpack(args.download_dir, args.audio_dir)
        if args.command in ("extract", "all"):
            extract(
                args.audio_dir, args.out_dir, jobs=args.jobs, groundtruth_dir=args.groundtruth_dir, audio_suffix=args.audio_suffix
            )
            log.info("next: %s", next_commands(args.out_dir))
            # failed.txt holds the failures of this run's clips only (covered): earlier suffixes are gone
            failed = read_failure_list(args.out_dir / "failed.txt")
            if failed:  # SPEC §8: the other clips are prepared; the missing ones are listed and the command fails
                print(format_failures(failed, args.out_dir / "failed.txt", "audio file"), file=sys.stderr)
                return 1
    except NothingPrepared as e:  # the error, then each file's FAILED line
        return report_nothing_prepared(e)
    except (MTTError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not the traceback of the process pool
        print(interrupted_message(e), file=sys.stderr)
        return 130
    return 0


def next_commands(out_dir: Path, target: str = "target_mtt", default_out_dir: Path = DEFAULT_OUT_DIR) -> str:
    """The extraction and probing commands on the mels in ``out_dir``, with every setting a non-default folder needs.

    ``target`` (``target_mtt``, ``target_gtzan``) reads the ground truth next to
    ``datamodule.base_dir``; ex_tl has no such key, so its ``<target>_tl`` is given the three ground truths.
    """
    extraction = f"python ex_maest.py extract_embeddings with maest_30s_from_passt_infer {target}"
    probe = f"python ex_tl.py with {target}_tl"
    if Path(out_dir).resolve() != Path(default_out_dir).resolve():
        d = Path(out_dir).resolve().as_posix()
        extraction += " " + shlex.quote(f"datamodule.base_dir={d}")
        probe += "".join(
            " " + shlex.quote(f"groundtruth_{key}={d}/groundtruth-{split}.pk")
            for key, split in (("train", "train"), ("val", "validation"), ("test", "test"))
        )
    return f"{extraction}; then {probe}"


if __name__ == "__main__":
    sys.exit(main())
