"""`plmrun` command line: data, train, eval, export, embed, probe, zeroshot, report, config.

Every user-facing failure (bad config, bad data, missing model, refused resume) prints one line,
`error: ...`, and exits with status 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path


# ------------------------------------------------------------------ train
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the default small model on the bundled corpus)",
        description="Train a pLM. Options are --section.key=value overrides of the config "
        "(see `plmrun config`), applied after --config. Rerunning the same command "
        "continues its unfinished run. Exit status: 0 finished, 2 error (including a "
        "diverged run), 143/130 stopped by SIGTERM/SIGINT with a checkpoint saved.",
    )
    p.add_argument("--config", help="YAML config file or the name of a shipped config (e.g. debug, esm2_8m)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its latest checkpoint (without --resume "
        "and --logging.name, the newest unfinished run with the same config is continued)",
    )
    p.add_argument(
        "--init-from-hf",
        metavar="PATH",
        help="start from a Hugging Face ESM-2 folder (esm2 preset), an esm package ESM C folder (esmc) "
        "or a plmrun model",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="when the run finishes, export it and upload it to this Hub "
        "repo as `plmrun export --push-to-hub` does (token from HF_TOKEN; = --logging.push_to_hub=REPO)",
    )
    p.set_defaults(func=_cmd_train, takes_overrides=True)


def _cmd_train(args, overrides) -> int:
    from plmrun.config import ConfigError, build_config, validate
    from plmrun.train.parallelize import leave_distributed
    from plmrun.train.trainer import train

    if args.resume:
        if args.config:
            raise ConfigError("--resume continues a run with its saved config; do not pass --config")
        from plmrun.train.rundir import resume_config

        cfg = resume_config(Path(args.resume), overrides)  # overrides: only the keys an extension may change
        if args.push_to_hub:
            cfg.logging.push_to_hub = args.push_to_hub
            validate(cfg)
    else:
        push = [f"--logging.push_to_hub={args.push_to_hub}"] if args.push_to_hub else []
        cfg = build_config(args.config, [*overrides, *push])
    # SIGTERM/SIGINT: checkpointed and stopped, not finished: 128 + the signal (143, 130) tells schedulers apart
    try:
        return train(cfg, resume=args.resume, init_from_hf=args.init_from_hf).get("exit_code", 0)
    finally:
        leave_distributed()


# ------------------------------------------------------------------ eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model under the one MLM protocol (fixed masks)")
    p.add_argument("model", nargs="?", help="run directory, checkpoint, model folder or Hugging Face folder")
    p.add_argument("--hf", metavar="PATH_OR_NAME", help="a Hugging Face EsmForMaskedLM (local folder or hub name)")
    p.add_argument(
        "--dataset",
        default="bundled",
        help="prepared dataset directory, or a FASTA[.gz/.xz]/parquet/CSV "
        "file (prepared into the cache on first use, evaluated whole) (default: bundled corpus)",
    )
    p.add_argument("--split", default=None, help="split of a prepared dataset to evaluate (default: valid)")
    p.add_argument("--column", help="sequence column of a parquet/CSV --dataset file")
    p.add_argument(
        "--invalid",
        choices=["error", "skip", "x"],
        default="error",
        help="letters outside the vocabulary in a --dataset file: error, skip the record, or read as X",
    )
    p.add_argument(
        "--random-init-control",
        action="store_true",
        help="also evaluate the same architecture and seed untrained, with the difference and a "
        "95%% bootstrap interval over sequences",
    )
    p.add_argument("--subset", type=int, default=0, help="only the first N sequences (default: all)")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per eval batch (results do not depend on it)")
    p.add_argument("--eval-seed", type=int, default=None, help="mask seed (default: the run's eval.seed)")
    p.add_argument(
        "--mask-rate", type=float, default=None, help="fraction of residues masked (default: the run's eval.mask_rate)"
    )
    p.add_argument(
        "--max-length", type=int, default=None, help="eval crop in tokens (default: the run's eval.max_length)"
    )
    from plmrun.eval.flags import add_device_flag

    add_device_flag(p)
    p.add_argument("--out", help="also write the metrics as JSON here")
    p.set_defaults(func=_cmd_eval)


def _run_config_file(spec: str) -> Path | None:
    """config.yaml of the run a model path belongs to (the run directory, its model/ folder or one of
    its checkpoints), or None for a model from elsewhere (HF folder, export, hub name)."""
    from plmrun.eval.mlm_command import run_dir_of

    run = run_dir_of(spec)
    return run / "config.yaml" if run is not None else None


def _cmd_eval(args) -> int:
    import dataclasses

    import numpy as np
    import torch

    from plmrun.config import ConfigError, EvalConfig, load_yaml, validate
    from plmrun.device import resolve_device
    from plmrun.eval.metrics import BOOTSTRAP_RESAMPLES, paired_bootstrap
    from plmrun.eval.mlm import evaluate
    from plmrun.eval.mlm_command import check_subset, eval_source, format_line, unigram_baseline

    if bool(args.model) == bool(args.hf):
        raise ConfigError("give exactly one of MODEL or --hf")
    if args.out:
        from plmrun.outputs import check_output_file, model_inputs

        check_output_file(args.out, [*model_inputs(args.model or args.hf), args.dataset, args.hf])
    device = resolve_device(args.device)
    run_cfg = None if args.hf else _run_config_file(args.model)
    run = validate(load_yaml(run_cfg)) if run_cfg else None
    cfg = run.eval if run else EvalConfig()  # a run's own eval protocol
    flags = {
        "seed": args.eval_seed,
        "mask_rate": args.mask_rate,
        "max_length": args.max_length,
        "token_budget": args.token_budget,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    _check_eval_flags(cfg, args.subset)
    from plmrun.eval.inference import load_eval_model

    name = args.hf or args.model
    model = load_eval_model(name, device=device, max_length=cfg.max_length)  # first: a wrong path or a length past
    # the model's position limit fails before any preparing
    source, split, _ = eval_source(args.dataset, args.split, column=args.column, invalid=args.invalid)
    check_subset(args.subset, source, split, args.dataset)
    unigram, unigram_source = unigram_baseline(run_cfg.parent if run_cfg else None, source)
    models = [model] + ([model.random_init(run.train.seed if run else 0)] if args.random_init_control else [])
    results = []
    for m in models:
        with torch.inference_mode():
            metrics = evaluate(
                m.net,
                source,
                cfg,
                subset=args.subset,
                device=device,
                unigram=unigram,
                per_sequence=args.random_init_control,
            )
        results.append(
            {
                "model": m.name,
                "dataset": args.dataset,
                "split": split,
                "subset": args.subset,
                "eval_seed": cfg.seed,
                "mask_rate": cfg.mask_rate,
                "max_length": cfg.max_length,
                **metrics,
                "unigram_source": unigram_source,
            }
        )
    per_seq = [r.pop("per_sequence", None) for r in results]
    for r in results:
        print(format_line({k: (v.replace(" ", "_") if isinstance(v, str) else v) for k, v in r.items()}))
    out = results[0]
    if args.random_init_control:
        (loss_a, n), (loss_b, _) = per_seq
        diff = paired_bootstrap(loss_a - loss_b, n)
        out = {**results[0], "random_init_control": results[1], "model_minus_random_init": {"loss": diff}}
        print(
            f"model - random init: loss {diff['diff']:+.4f} (95% CI {diff['ci95'][0]:+.4f} .. {diff['ci95'][1]:+.4f}, "
            f"{BOOTSTRAP_RESAMPLES} bootstrap resamples of {int(np.count_nonzero(n))} sequences)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _check_eval_flags(cfg, subset: int) -> None:
    """Each eval flag's allowed range as one line naming the flag (the run's own setting where none was given):
    the eval section's own rules (config.validate_eval), worded with the flags."""
    from plmrun.config import EVAL_FLAGS, check_at_least, validate_eval

    validate_eval(cfg, EVAL_FLAGS)
    check_at_least(subset, 0, "--subset", " (0 = the whole split)")


# ------------------------------------------------------------------ config
def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config (YAML) or the option table")
    p.add_argument("--config", help="YAML config file or shipped config name")
    p.add_argument("--markdown", action="store_true", help="print the option table (docs/reference/config.md) instead")
    p.add_argument("--list", action="store_true", help="list the shipped configs")
    p.set_defaults(func=_cmd_config, takes_overrides=True)


def _cmd_config(args, overrides) -> int:
    from plmrun.config import build_config, list_shipped_configs, options_markdown
    from plmrun.train.rundir import config_yaml

    if args.markdown:
        print(options_markdown())
    elif args.list:
        print("\n".join(list_shipped_configs()))
    else:
        print(config_yaml(build_config(args.config, overrides)), end="")
    return 0


# ------------------------------------------------------------------ main
_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on the device holding it; free space there or choose another --out",
    errno.EDQUOT: "disk quota exceeded on the device holding it; free space there or choose another --out",
    errno.EACCES: "permission denied; fix its permissions or choose another path",
    errno.EPERM: "operation not permitted; fix its permissions or choose another path",
    errno.EROFS: "read-only file system; choose a path on a writable file system",
    errno.ENOENT: "no such file or directory; check the path (and that its parent folder exists)",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.EISDIR: "is a directory, a file was expected; give a file path",
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the file it concerns and what to do, by errno (so a full disk, a
    read-only mount or a missing folder each say how to fix it, never a traceback)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "(file not named)"
    hint = _OS_ERROR_HINTS.get(e.errno) or e.strerror or str(e)
    return f"{where}: {hint}".replace("\n", " ")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad int, an unknown choice, a missing argument) are one line, exit 2, like
    every other flag error; subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} -h`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plmrun", description="Speedrun pretraining of protein language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from plmrun.data.cli import add_data_commands

    data = sub.add_parser("data", help="prepare, split, download, inspect datasets")
    add_data_commands(data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True))
    _add_train(sub)
    _add_eval(sub)
    from plmrun.eval.embed import add_embed_command
    from plmrun.eval.export import add_export_command
    from plmrun.eval.probe import add_probe_command
    from plmrun.eval.report import add_report_command
    from plmrun.eval.zeroshot import add_zeroshot_command

    for add in (add_export_command, add_embed_command, add_probe_command, add_zeroshot_command, add_report_command):
        add(sub)
    from plmrun.finetune.command import add_finetune_command

    add_finetune_command(sub)
    from plmrun.experiments.record import add_record_command

    add_record_command(sub)
    _add_config(sub)
    from plmrun.experiments.sweep import add_sweep_command

    add_sweep_command(sub)
    from plmrun.experiments.plan import add_plan_command

    add_plan_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    from plmrun.errors import PlmrunError

    try:
        if getattr(args, "takes_overrides", False):
            return args.func(args, rest)
        return args.func(args) or 0
    except PlmrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
