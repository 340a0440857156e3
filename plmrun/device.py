"""The one place a device name ("auto", "cpu", "cuda", "cuda:N") becomes a torch.device."""

from __future__ import annotations

import torch

from plmrun.errors import PlmrunError


class DeviceError(PlmrunError):
    """The requested device is not available on this machine."""


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> this rank's CUDA device if one is visible, else CPU; an explicit cuda without CUDA is refused."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA device is visible; use --device cpu (or auto)")
        index = int(name.partition(":")[2] or local_rank)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
