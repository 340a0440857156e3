"""Checksums for folders that must be whole: checkpoints, saved and exported models.

`MANIFEST.json` is written last (temp name, then rename), listing every file's size and sha256, so
a folder with a manifest was complete when it was written, and `verify_manifest` finds a truncated,
byte-flipped, missing or hand-edited file before anything is loaded from it. The manifest carries a
checksum of its own body, so editing a fingerprint in it by hand is detected too.

The limit: a checksum proves the files are as written, not who wrote them. Anyone who can change the
files can rewrite MANIFEST.json with `write_manifest`, and it verifies. So the manifest finds damage,
not tampering; that no file plmrun reads can run code is plmrun.safe_pickle's job (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from plmrun.atomic import follow_umask as follow_umask  # re-exported: finetune/run.py imports it here
from plmrun.atomic import write_text
from plmrun.errors import PlmrunError

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20


class ManifestError(PlmrunError):
    """A folder's files do not match its manifest (truncated, corrupted, missing or edited)."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _body_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: Path, files: Iterable[str] | None = None) -> Path:
    """Checksum `files` (relative names; default: every regular file below `folder`) into MANIFEST.json."""
    folder = Path(folder)
    if files is None:
        files = sorted(
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
        )
    entries = {}
    for name in files:
        p = folder / name
        entries[name] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    body = {"format": 1, "files": entries, "digest": _body_digest(entries)}
    write_text(folder / MANIFEST, json.dumps(body, indent=1) + "\n")
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict | None:
    """The manifest's file table, or None where the folder has none (older folders, foreign models)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        digest = data["digest"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ManifestError(
            f"{path}: unreadable manifest (truncated or not JSON); the folder is not trustworthy"
        ) from None
    if _body_digest(files) != digest:
        raise ManifestError(f"{path}: the manifest was edited after it was written (its checksum does not match)")
    return files


def verify_manifest(folder: Path, *, required: bool = False) -> bool:
    """Check every listed file's size and sha256; True if verified, False if there is no manifest.

    Sizes first (cheap, catches truncation), then hashes. With required=True a missing manifest is
    an error (a folder that should have one was not finished).
    """
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        if required:
            raise ManifestError(f"{folder}: no {MANIFEST}; the folder was not completely written")
        return False
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            raise ManifestError(f"{p}: listed in {MANIFEST} but missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise ManifestError(f"{p}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)")
    for name, meta in files.items():
        p = folder / name
        if file_sha256(p) != meta["sha256"]:
            raise ManifestError(f"{p}: contents do not match the checksum in {MANIFEST} (corrupted or edited)")
    return True
