"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Every writer builds under a hidden temporary name beside its target (the same file system, so the
final rename is atomic), flushes it to disk, then renames it into place; on any failure the
temporary is removed and the error raised again. A full disk is then an OSError(ENOSPC) whichever
library wrote: torch's zip writer reports a short write as `RuntimeError: [enforce fail at
inline_container.cc:...]` and safetensors as `SafetensorError: ... (os error 28)`, which `os_error`
turns back into the OSError every caller and `plmrun.cli` already handle in one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "failed writing file")
"How torch's PyTorchStreamWriter (inline_container.cc) reports a write the OS cut short."
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _umask() -> int:
    """The process umask, read without setting it where Linux shows it (setting it briefly would
    race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def follow_umask(path) -> None:
    """Give a written file the ordinary mode (0666 less the umask): safetensors' `save_file` and
    temp-file writers create 0600 files, which other users of a shared model folder cannot read."""
    os.chmod(path, 0o666 & ~_umask())


def os_error(e: BaseException, path=None) -> OSError | None:
    """The OSError behind a failed write, or None where `e` is no file-system problem (a bug).

    torch's zip writer gives no errno: a short write it reports is taken for a full disk, the only
    way a local write comes up short. safetensors (Rust) quotes the errno in its message.
    """
    if isinstance(e, OSError):
        return e
    where = None if path is None else str(path)
    msg = str(e)
    if isinstance(e, RuntimeError) and "inline_container.cc" in msg and any(s in msg for s in _TORCH_SHORT_WRITE):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
    if type(e).__name__ == "SafetensorError":
        m = _RUST_OS_ERROR.search(msg)
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))), where)
    return None


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling `.NAME.KIND-PID@HOST-RAND` of `path` to build it in: the pid and host let a later
    run tell a killed run's leftover (removed by `remove_stale_siblings`) from a live run's."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_siblings(path: Path) -> list:
    """Remove the `temp_sibling`s of `path` whose process is dead (a killed or crashed run on this host);
    those of live processes and of other hosts are kept. Returns the removed paths."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z]+-(\d+)@(.+)-[0-9a-f]{{8}}$")
    removed = []
    if not path.parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and m.group(2) == host and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Flush the finished temporary file `tmp` to disk and rename it to `path` (then flush the folder)."""
    _fsync(Path(tmp))
    os.replace(tmp, path)
    _fsync(Path(path).parent)


def _reraise(e: BaseException, path) -> None:
    """Raise `e` as the OSError behind it where a library hid one in its own exception type."""
    err = os_error(e, path) if isinstance(e, Exception) else None
    if err is not None and err is not e:
        raise err from None


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer (ours, torch, safetensors); on success it is
    flushed and renamed to `path` with the ordinary file mode, on failure removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        follow_umask(tmp)
        commit(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _reraise(e, path)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, data: Any, *, indent: int | None = 2, default=None) -> None:
    """`data` as JSON (and a final newline) in `path`, atomically."""
    write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished folder `src` to `dst`; an existing `dst` is moved aside first and removed
    only once `src` is in place, so a failed rename leaves the old folder under `dst` (a kill between
    the two renames leaves it under its hidden `.NAME.old-*` sibling)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = temp_sibling(dst, "old")
        os.rename(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    _fsync(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to build it in; on success it replaces `path`
    (`replace_dir`), on failure it is removed and the error raised as its OSError where it is one."""
    path = Path(path)
    remove_stale_siblings(path)  # what a killed earlier writer left behind
    tmp = temp_sibling(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise(e, path)
        raise
