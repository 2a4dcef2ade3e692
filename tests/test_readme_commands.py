"""README's command lines: every command, named config and key they use exists, and the config they build passes its checks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from sacred.arg_parser import get_config_updates
from sacred.initialize import create_run

import ex_maest
import ex_tl

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = {"ex_maest.py": ex_maest.ex, "ex_tl.py": ex_tl.ex}
COMMAND = re.compile(r"python (ex_maest\.py|ex_tl\.py)((?: +[^ #]+)*)")


def _snippets(text: str) -> list[str]:
    """Code blocks (a trailing backslash continues the line; comments dropped) and inline code (one line each)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.S | re.M)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split("  #")[0])
    return lines + [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(program, its arguments) of every `python ex_*.py ...` in README, placeholders left out:
    ``…`` and ``<...>`` stand for the reader's values, ``[key=value]`` marks an optional key (kept)."""
    found = []
    for snippet in _snippets((ROOT / "README.md").read_text(encoding="utf-8")):
        snippet = re.sub(r"<[^>]*>", "…", snippet)
        snippet = re.sub(r"(?<!\S)\[([^\]\s]+)\]", r"\1", snippet)
        for match in COMMAND.finditer(snippet):
            try:
                args = shlex.split(match.group(2))
            except ValueError:  # a quote the line break cut: the rest of the command is elsewhere
                args = shlex.split(match.group(2).rsplit("'", 1)[0])
            found.append((match.group(1), [a for a in args if "…" not in a]))
    return found


COMMANDS = readme_commands()


def test_readme_has_the_commands_users_copy():
    assert len(COMMANDS) >= 40
    assert ("ex_maest.py", ["with", "demo"]) in COMMANDS and ("ex_tl.py", ["with", "target_mtt_tl", "probe_search"]) in COMMANDS


@pytest.mark.parametrize("program,args", COMMANDS, ids=[f"{p} {' '.join(a)}"[:80] for p, a in COMMANDS])
def test_every_readme_command_builds_a_valid_config(program, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ex = PROGRAMS[program]
    command = args[0] if args and args[0] != "with" else ex.default_command
    assert command in ex.commands, f"README runs {program} {command}, which is no command"
    updates = args[args.index("with") + 1 :] if "with" in args else []
    updates = [a for a in updates if "=" in a or not a.endswith(".json")]  # a prepared dataset.json: the reader's file
    config_updates, named = get_config_updates(updates)
    unknown = [n for n in named if n not in ex.named_configs]
    assert not unknown, f"README names {unknown}, which {program} does not have"
    create_run(ex, command, config_updates, named)  # unknown keys and bad values raise here


SCRIPT = re.compile(r"python (-m [\w.]+|benchmarks/\w+\.py)((?: +[^ #`]+)*)")


def readme_scripts() -> dict[str, list[list[str]]]:
    """The arguments README gives each `python -m <module>` and `python benchmarks/<file>.py`."""
    found: dict[str, list[list[str]]] = {}
    for snippet in _snippets((ROOT / "README.md").read_text(encoding="utf-8")):
        for match in SCRIPT.finditer(snippet):
            if match.group(1) != "-m pytest":
                found.setdefault(match.group(1), []).append(shlex.split(re.sub(r"(?<!\S)\[([^\]]+)\]", r"\1", match.group(2))))
    return found


SCRIPTS = readme_scripts()


@pytest.mark.parametrize("program", sorted(SCRIPTS))
def test_every_readme_script_takes_the_options_and_steps_readme_gives_it(program):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *program.split(), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    usage = done.stdout
    steps = {step for choices in re.findall(r"positional arguments:\n\s+\{([\w,-]+)\}", usage) for step in choices.split(",")}
    for args in SCRIPTS[program]:
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", usage), f"README gives {program} {flag}, which its --help does not list"
        if steps and args and not args[0].startswith("-"):
            assert args[0] in steps, f"README runs {program} {args[0]}, not one of {sorted(steps)}"


def test_readme_scripts_were_found():
    assert {"-m datasets.prepare_folder", "-m datasets.gtzan.preprocess", "-m hear_maest.validate", "benchmarks/bench_speed.py"} <= set(SCRIPTS)
