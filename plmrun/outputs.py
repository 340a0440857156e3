"""Where a command may write: never onto its inputs, never over a folder plmrun did not create.

Every command with an output checks it here before any work starts (one rule for all):

- `check_output_file`: an output file (eval/probe/finetune JSON, zeroshot CSV, embeddings, `data cat`)
  is not one of the command's inputs or a file inside an input folder.
- `check_output_dir`: an output folder (`data prepare/split/download`, `export`, `report`) does not
  overlap an input (is it, holds it, or lies inside it). An existing non-empty folder is replaced
  only with --overwrite, and only when plmrun created it: it carries plmrun's marker file
  (`mark_output`, written into every output folder plmrun creates) and holds nothing else than
  what the marker lists. Anything else is refused with one line naming the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from plmrun.errors import PlmrunError

MARKER = ".plmrun-output.json"
"Written into every output folder plmrun creates: the command and the top-level entries it wrote."
_SHOWN = 5

PathLike = str | os.PathLike


class OutputError(PlmrunError):
    """An output path that would overwrite an input, or a folder plmrun did not create."""


def _resolved(p: PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def model_inputs(spec: PathLike | None) -> list[Path]:
    """What a model argument reads: a run directory's config, model/ and checkpoints/, else the path itself
    (a model, export, Hugging Face or ESM C folder, or a checkpoint); nothing for a Hub name."""
    if not spec or not Path(spec).exists():
        return []
    p = Path(spec)
    if (p / "model").is_dir() or (p / "checkpoints").is_dir():
        return [p / "config.yaml", p / "model", p / "checkpoints"]
    return [p]


def _clash(out: Path, inputs: Iterable[PathLike]) -> Path | None:
    """The first input `out` would write over: the same file, or `out` inside an input folder."""
    for spec in inputs:
        if not spec or not Path(spec).exists():
            continue
        inp = _resolved(spec)
        if _inside(out, inp):
            return Path(spec)
    return None


def check_output_file(
    path: PathLike, inputs: Iterable[PathLike] = (), *, flag: str = "--out", error: type[Exception] = OutputError
) -> Path:
    """`path` as an output file: not an input or inside an input folder. Returns it. (A folder or a missing
    parent is the OS's one-line error when the command writes.)"""
    out = _resolved(path)
    hit = _clash(out, inputs)
    if hit is not None:
        what = "is the input" if _resolved(hit) == out else f"lies inside the input folder {hit}"
        raise error(f"{flag} {path}: {what}; writing it would overwrite what the command reads, choose another path")
    return Path(path)


def check_output_dir(
    path: PathLike,
    inputs: Iterable[PathLike] = (),
    *,
    overwrite: bool,
    flag: str = "--out",
    error: type[Exception] = OutputError,
) -> Path:
    """`path` as an output folder to create, or to replace under --overwrite (see the module docstring)."""
    out = _resolved(path)
    if out.exists() and not out.is_dir():
        raise error(f"{flag} {path}: exists and is not a directory")
    for spec in inputs:
        if not spec or not Path(spec).exists():
            continue
        inp = _resolved(spec)
        if _inside(inp, out):
            what = "is the input" if inp == out else f"holds the input {spec}"
            raise error(
                f"{flag} {path}: {what}; the output folder must not be or contain an input, choose another {flag}"
            )
        if _inside(out, inp):
            raise error(f"{flag} {path}: lies inside the input folder {spec}; choose another {flag}")
    if not out.is_dir() or not any(out.iterdir()):
        return Path(path)
    if not overwrite:
        raise error(f"{path}: output directory already exists and is not empty (pass --overwrite to replace it)")
    listed = read_marker(out)
    if listed is None:
        names = sorted(p.name for p in out.iterdir())
        raise error(
            f"{flag} {path}: not a folder plmrun created (no {MARKER}; folders written before plmrun marked "
            f"its outputs have none either), so --overwrite will not replace it; it holds {names_line(names)}: "
            f"move them away or choose another {flag}"
        )
    foreign = foreign_entries(out, listed)
    if foreign:
        raise error(
            f"{flag} {path}: holds files plmrun did not write there ({names_line(foreign)}), so --overwrite "
            f"will not replace it; move them away or choose another {flag}"
        )
    return Path(path)


def foreign_entries(folder: PathLike, known: Iterable[str]) -> list[str]:
    """Top-level names in `folder` that plmrun did not write there (neither in `known` nor its marker)."""
    known = set(known) | {MARKER}
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in known)


def names_line(names: list) -> str:
    """Up to five names, comma-separated, and how many more (for one-line messages)."""
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def read_marker(folder: PathLike) -> set | None:
    """The top-level names plmrun wrote into `folder` (from its marker), None when it has no valid marker."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
        return set(data["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_output(folder: PathLike, command: str) -> None:
    """Mark `folder` (complete, not yet renamed into place) as plmrun's: the command and its top-level entries."""
    folder = Path(folder)
    entries = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"written_by": f"plmrun {command}", "entries": entries}, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)
