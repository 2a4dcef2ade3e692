"""pyproject.toml: the wheel holds the packages and label files; installed, `from models import get_maest` and README's example work anywhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-extras.txt", "ex_maest.py", "ex_tl.py",
           "models", "helpers", "configs", "hear_maest", "datasets", "data"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel offline from a copy of the sources (the build writes build/ and *.egg-info there), install it with --target."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "wheel"), str(src)], check=True, env=env)
    (wheel,) = (tmp / "wheel").glob("maest-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(tmp / "site"), str(wheel)], check=True, env=env)
    return {"wheel": wheel, "site": tmp / "site", "tmp": tmp}


def run_python(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that sees the installed wheel, never the repository (cwd elsewhere, no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_holds_the_packages_the_experiments_and_the_label_files(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for module in ("models/__init__.py", "models/registry.py", "helpers/module.py", "helpers/metric_logger.py",
                   "configs/maest.py", "configs/runs.py", "ex_maest.py", "ex_tl.py"):
        assert module in names, module
    assert {"models/labels/labels-400.txt", "models/labels/labels-519.txt"} <= names
    # Not the dataset preparers: a top-level `datasets` would overwrite Hugging Face's `datasets` package.
    assert not any(n.startswith(("tests/", "benchmarks/", "datasets/")) for n in names)
    # A package added to the repository must be added to pyproject.toml's list too.
    for package in ("models", "helpers", "configs", "hear_maest"):
        for init in (ROOT / package).rglob("__init__.py"):
            module = init.relative_to(ROOT).as_posix()
            assert module in names, f"{module} is not in the wheel: add its package to [tool.setuptools] packages in pyproject.toml"
            assert {p.relative_to(ROOT).as_posix() for p in init.parent.glob("*.py")} <= names


def test_installed_api_works_from_another_directory(installed, tmp_path):
    code = textwrap.dedent("""
        import models
        from models import get_maest, get_spec
        net = get_maest("maest-tiny", n_classes=3)
        labels = get_spec("discogs-maest-30s-pw-129e").labels()
        print(models.__file__, net.n_classes, len(labels), labels[0], sep="|")
    """)
    out = run_python(code, installed["site"], tmp_path)
    assert out.returncode == 0, out.stderr
    path, n_classes, n_labels, first = out.stdout.strip().split("|")
    assert Path(path).is_relative_to(installed["site"])  # the installed copy, not the repository
    assert (n_classes, n_labels, first) == ("3", "400", (ROOT / "data/labels/labels-400.txt").read_text().splitlines()[0])


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using MAEST from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's 'Using MAEST from Python' has no python code block"
    return match.group(1)


def test_readme_python_example_runs_as_written(installed, tmp_path):
    """README's code, unchanged, with the released 30 s model shrunk (width 64, 7 blocks) and its checkpoint made here."""
    import numpy as np
    import soundfile as sf

    t = np.arange(3 * 16000) / 16000
    sf.write(tmp_path / "song.mp3", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    prelude = textwrap.dedent("""
        import dataclasses, pathlib, torch
        import models.registry as registry
        spec = registry.REGISTRY["discogs-maest-30s-pw-129e"]
        registry.REGISTRY[spec.name] = dataclasses.replace(spec, config={**spec.config, "embed_dim": 64, "num_heads": 4, "depth": 7})
        state = registry.get_maest(spec.name).state_dict()
        pathlib.Path("weights").mkdir()
        torch.save({"state_dict": {f"{p}.{k}": v for p in ("net", "net_swa") for k, v in state.items()}}, "weights/" + spec.weights_file)
    """)
    check = "\nassert tuple(logits.shape) == (1, 400) and tuple(emb.shape) == (1, 3, 64), (logits.shape, emb.shape)\nprint('ok')\n"
    out = run_python(prelude + readme_python_example() + check, installed["site"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
