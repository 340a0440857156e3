"""The flags the inference commands share, declared once: --max-length, --token-budget (embed, probe,
zeroshot) and --device (also eval), and their check by config's value rules, before a file is read
or a model loaded, so each command words a bad value the same way."""

from __future__ import annotations

import argparse

from plmrun.config import check_at_least, check_window

DEVICE_HELP = "auto (CUDA when visible, else CPU), cpu, cuda or cuda:N"


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_window_flags(p: argparse.ArgumentParser, longer: str) -> None:
    """--max-length (None: the preset's default window) and --token-budget; `longer` says what happens to a
    sequence longer than one window in this command."""
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help=f"tokens per forward window incl. <cls>/<eos>; {longer} "
        "(default: whole sequences for rotary presets, 1024 for esm2)",
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=8192,
        help="tokens per packed batch; it grows to hold one window (results do not depend on it)",
    )


def check_window_flags(args: argparse.Namespace) -> None:
    """The window (>= 3 tokens) and the batch budget (>= 1; plmrun.eval.inference.window_plan grows it to
    one window). The position limit of the model is checked when it loads."""
    if args.max_length is not None:
        check_window(args.max_length, "--max-length")
    check_at_least(args.token_budget, 1, "--token-budget", " (batches grow to hold one window)")
