"""The README's quick commands run, and print what the README quotes; its links resolve.

Markers in README.md (HTML comments, invisible when rendered) say what the test does:
- a fenced block right after `<!-- test -->` runs line by line, in README order, in one fresh
  directory (so later blocks use the run the quickstart trained). `plmrun ...` lines run in this process
  through `plmrun.cli.main`; other lines (shell redirects, `&&`) run in bash with `plmrun` on PATH.
  Every line must exit 0.
- a fenced block right after `<!-- test: output -->` must appear, line by line and in order, in the
  stdout of the test block before it; `...` matches anything. After `<!-- test: output, numbers vary -->`
  every word with a digit in it (times, losses, `bf16`) matches any word too.
The default run and the benchmarks are in plain blocks: they take minutes and are not run here.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from plmrun.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "<", "&"}


@dataclass
class Block:
    kind: str  # "test", "output" or "output-numbers"
    line: int  # README line of the opening fence
    text: list[str]


def readme_blocks(text: str) -> list[Block]:
    """The marked fenced blocks of the README, in order."""
    kinds = {
        "<!-- test -->": "test",
        "<!-- test: output -->": "output",
        "<!-- test: output, numbers vary -->": "output-numbers",
    }
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        kind = kinds.get(lines[i].strip())
        if kind is None:
            assert not lines[i].strip().startswith("<!-- test"), f"README.md:{i + 1}: unknown marker {lines[i]!r}"
            i += 1
            continue
        assert lines[i + 1].startswith("```"), f"README.md:{i + 2}: a marker must be followed by a fenced block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append(Block(kind, i + 2, lines[i + 2 : end]))
        i = end + 1
    return blocks


def commands(block: Block) -> list[str]:
    """The block's command lines, with `\\` continuations joined and blank lines dropped."""
    out, pending = [], ""
    for line in block.text:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def line_pattern(expected: str, numbers_vary: bool) -> re.Pattern:
    parts = []
    for tok in re.split(r"(\s+)", expected.strip()):
        if not tok:
            continue
        if tok.isspace():
            parts.append(r"\s+")
        elif numbers_vary and re.search(r"\d", tok):
            parts.append(r"\S+")
        else:
            parts.append(".*".join(re.escape(p) for p in tok.split("...")))
    return re.compile("".join(parts))


def assert_output(expected: Block, stdout: str) -> None:
    """Every expected line matches a stdout line, in order (other stdout lines may come between)."""
    actual = [ln.strip() for ln in stdout.split("\n")]
    pos = 0
    for k, want in enumerate(expected.text):
        if not want.strip():
            continue
        pat = line_pattern(want, expected.kind == "output-numbers")
        hit = next((j for j in range(pos, len(actual)) if pat.fullmatch(actual[j])), None)
        assert hit is not None, (
            f"README.md:{expected.line + 1 + k}: {want!r} not printed (in order); the command printed:\n{stdout}"
        )
        pos = hit + 1


def run_line(cmd: str, cwd: Path, env: dict, capsys) -> str:
    """Run one README line; return its stdout."""
    argv = shlex.split(cmd, comments=True)
    if argv and argv[0] == "plmrun" and not SHELL_OPERATORS & set(argv):
        code = main(argv[1:])
        out = capsys.readouterr()
        assert code == 0, f"`{cmd}` exited {code}:\n{out.err[-3000:]}"
        return out.out
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"`{cmd}` exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_readme_has_the_set_up_commands_and_tests_every_command():
    text = README.read_text()
    assert "bash scripts/setup.sh && plmrun train" in text
    assert "bash scripts/setup.sh --dev && python -m pytest -q" in text
    blocks = readme_blocks(text)
    tested = " ".join(" ".join(commands(b)) for b in blocks if b.kind == "test")
    listed = re.findall(r"^    (\w+)\s", build_parser().format_help(), flags=re.M)
    assert len(listed) >= 13, listed
    missing = [c for c in listed if f"plmrun {c} " not in tested + " "]
    assert not missing, f"README: no tested example of plmrun {', '.join(missing)}"
    kinds = [b.kind for b in blocks]
    for k, kind in enumerate(kinds):
        if kind != "test":
            assert k > 0 and kinds[k - 1] == "test", f"README.md:{blocks[k].line}: output block without a test block"


def test_readme_is_a_short_guide():
    assert len(README.read_text().splitlines()) <= 210


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(md: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", md, flags=re.M)
    }


@pytest.mark.parametrize(
    "doc",
    [README, *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md", ROOT / "records" / "README.md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.relative_to(ROOT)}: link to {target} leads nowhere"
        if anchor:
            assert anchor in anchors(path.read_text()), f"{doc.relative_to(ROOT)}: link to {target}: no such heading"


@pytest.mark.slow
def test_readme_quick_commands_run_and_print_what_it_quotes(tmp_path, monkeypatch, capsys):
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "records").symlink_to(ROOT / "records")  # `plmrun record --table` reads ./records
    shim = bin_dir / "plmrun"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m plmrun.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PLMRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(work)
    env = dict(os.environ)
    stdout = ""
    blocks = readme_blocks(README.read_text())
    assert sum(b.kind == "test" for b in blocks) >= 5
    for block in blocks:
        if block.kind == "test":
            stdout = "".join(run_line(cmd, work, env, capsys) for cmd in commands(block))
        else:
            assert_output(block, stdout)
