"""`plmrun finetune`'s parser, kept apart from the training code so building the CLI imports none of it."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from plmrun.eval.probe import TASKS

from .config import FinetuneConfig


def add_finetune_command(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="LoRA or full fine-tuning on a labelled table, reported beside the frozen probe",
        description="Fine-tune MODEL on a bundled probe task (" + ", ".join(TASKS) + ") or a CSV/TSV table. "
        "Settings: --config FILE (YAML) and --key value flags (e.g. --method full --max-steps 100); "
        "keys: "
        + ", ".join(f.name.replace("_", "-") for f in fields(FinetuneConfig))
        + " (each explained in plmrun/finetune/config.py). Rerunning the same command continues its run; "
        "under torchrun the ranks train with DDP. "
        "Exit status: 0 finished, 2 error, 143/130 stopped by SIGTERM/SIGINT with a checkpoint saved.",
    )
    p.add_argument("model", nargs="?", help="run directory, checkpoint, model folder, HF folder or Hub name")
    p.add_argument("--config", help="YAML file of finetune keys")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--out", help="also write the report as JSON here")
    p.set_defaults(func=_run, takes_overrides=True)


def _run(args, overrides) -> int:
    from plmrun.eval.probe import format_table
    from plmrun.train.parallelize import leave_distributed

    from .config import build
    from .run import finetune

    if args.out:
        from plmrun.outputs import check_output_file, model_inputs

        check_output_file(args.out, [*model_inputs(args.model), args.config])
    cfg = build(args.model, args.config, overrides)
    try:
        result = finetune(cfg, device=args.device)
    finally:
        leave_distributed()
    if result["exit_code"] or "tasks" not in result:  # stopped, or a torchrun rank other than 0
        return result["exit_code"]
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0
