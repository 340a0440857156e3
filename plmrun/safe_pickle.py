"""Pickled files read without running code: DCP checkpoint metadata and saved objects, `.pth`/`.bin` weights.

A pickle can call any importable function while it loads (`__reduce__`), and MANIFEST.json cannot
stop that: anyone who can write the file can rewrite its checksums (a checksum shows damage, not
tampering; docs/security.md). So every pickle plmrun reads goes through an allow-list:

- DCP's `.metadata` (torch unpickles it with plain `pickle.load`): `read_dcp_metadata` admits only
  DCP's metadata classes and the torch/builtin values they hold (torch.Size, dtypes, layouts, paths),
  and checks that every shard it points to is a file inside the checkpoint folder.
- DCP's non-tensor entries (torch's planner unpickles them with `weights_only=False`) and every
  `.pth`/`.bin` weight file: `torch.load(..., weights_only=True)`, torch's own allow-list (tensors,
  containers, numbers, strings).

`SafeReader` and `SafeLoadPlanner` plug both into `dcp.load`. Anything else in a file is refused with
one `UnsafePickleError` line naming the file and the first disallowed name.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from plmrun.errors import PlmrunError

DCP_METADATA = ".metadata"
_DCP_META = "torch.distributed.checkpoint.metadata"
ALLOWED = frozenset(
    {
        (_DCP_META, "Metadata"),
        (_DCP_META, "TensorStorageMetadata"),
        (_DCP_META, "BytesStorageMetadata"),
        (_DCP_META, "ChunkStorageMetadata"),
        (_DCP_META, "TensorProperties"),
        (_DCP_META, "StorageMeta"),
        (_DCP_META, "MetadataIndex"),
        (_DCP_META, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)
"(module, name) a DCP metadata pickle may name; besides these only torch dtypes, layouts and memory formats."


class UnsafePickleError(PlmrunError):
    """A pickled file names something outside the allow-list: loading it could run code, so it is refused."""


def _refusal(path, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused: it names {what}, which no plmrun or torch checkpoint holds (unpickling "
        "it could run code); the file was not written by plmrun, do not use it (docs/security.md)"
    )


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class admits only ALLOWED and torch's dtype/layout/memory-format constants."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise _refusal(self.path, f"{module}.{name}")


def read_dcp_metadata(path: Path, rank: int | None = None) -> Metadata:
    """The DCP Metadata of checkpoint folder `path`, unpickled through the allow-list and checked."""
    file = Path(path) / (DCP_METADATA if rank is None else f"__{rank}{DCP_METADATA}")
    with open(file, "rb") as f:
        try:
            meta = MetadataUnpickler(f, file).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
            raise UnsafePickleError(
                f"{file}: unreadable DCP metadata ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise _refusal(file, f"a {type(meta).__name__}, not DCP Metadata,")
    for info in (meta.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or pathlib.PurePath(name).name != name or "\\" in name:
            raise UnsafePickleError(
                f"{file}: refused: a shard path {name!r} that is not a file in {Path(path)} (the metadata was edited)"
            )
    return meta


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_dcp_metadata` (tensors it already reads weights_only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        meta = read_dcp_metadata(Path(self.path), kwargs.get("rank"))
        if getattr(meta, "storage_meta", None) is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but a saved non-tensor entry is unpickled with weights_only=True first."""

    def __init__(self, path: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = Path(path)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch_load_weights(value, f"{self.path} ({read_item.dest_index.fqn})")
        clean = io.BytesIO()  # re-serialised from the checked object: the parent's loader never sees the file's bytes
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def torch_load_weights(source, where) -> Any:
    """torch.load with weights_only=True; a file that needs more than tensors and containers is UnsafePickleError."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if named is None:  # not a disallowed name: damaged bytes, which the caller reports as such
            raise
        raise UnsafePickleError(
            f"{where}: refused: it holds pickled objects other than tensors (unpickling them "
            f"could run code; {named[:160]}); use safetensors weights or the original "
            "download (docs/security.md)"
        ) from None
