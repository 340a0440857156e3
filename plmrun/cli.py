"""`plmrun` command line: data, train, eval, export, embed, probe, zeroshot, report, config.

Every user-facing failure (bad config, bad data, missing model, refused resume) prints one line,
`error: ...`, and exits with status 2; tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


# ------------------------------------------------------------------ train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the default small model on the bundled corpus)",
                       description="Train a pLM. Options are --section.key=value overrides of the config "
                                   "(see `plmrun config`), applied after --config. Rerunning the same command "
                                   "continues its unfinished run. Exit status: 0 finished, 2 error (including a "
                                   "diverged run), 143/130 stopped by SIGTERM/SIGINT with a checkpoint saved.")
    p.add_argument("--config", help="YAML config file or the name of a shipped config (e.g. debug, esm2_8m)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint (without --resume "
                   "and --logging.name, the newest unfinished run with the same config is continued)")
    p.add_argument("--init-from-hf", metavar="PATH", help="start from a Hugging Face ESM-2 folder (esm2 preset)")
    p.set_defaults(func=_cmd_train, takes_overrides=True)


def _cmd_train(args, overrides) -> int:
    from plmrun.config import ConfigError, build_config, load_yaml, validate
    from plmrun.train.trainer import train
    if args.resume:
        run_cfg = Path(args.resume) / "config.yaml"
        if not run_cfg.is_file():
            raise ConfigError(f"{args.resume}: not a run directory (no config.yaml)")
        if args.config or overrides:
            raise ConfigError("--resume continues a run with its saved config; do not pass --config or overrides")
        cfg = validate(load_yaml(run_cfg))
        cfg.logging.run_root = str(Path(args.resume).parent)
    else:
        cfg = build_config(args.config, overrides)
    # SIGTERM/SIGINT: checkpointed and stopped, not finished: 128 + the signal (143, 130) tells schedulers apart
    return train(cfg, resume=args.resume, init_from_hf=args.init_from_hf).get("exit_code", 0)


# ------------------------------------------------------------------ eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model under the one MLM protocol (fixed masks)")
    p.add_argument("model", nargs="?", help="run directory, checkpoint, model folder or Hugging Face folder")
    p.add_argument("--hf", metavar="PATH_OR_NAME", help="a Hugging Face EsmForMaskedLM (local folder or hub name)")
    p.add_argument("--dataset", default="bundled", help="prepared dataset directory (default: bundled corpus)")
    p.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    p.add_argument("--subset", type=int, default=0, help="only the first N sequences (default: all)")
    p.add_argument("--token-budget", type=int, default=None, help="tokens per eval batch (results do not depend on it)")
    p.add_argument("--eval-seed", type=int, default=None, help="mask seed (default: eval.seed of the config)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="also write the metrics as JSON here")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    import torch
    from plmrun.config import ConfigError, EvalConfig
    from plmrun.data.shards import open_dataset
    from plmrun.eval.mlm import evaluate
    from plmrun.device import resolve_device
    if bool(args.model) == bool(args.hf):
        raise ConfigError("give exactly one of MODEL or --hf")
    device = resolve_device(args.device)
    from plmrun.eval.inference import load_eval_model
    name = args.hf or args.model
    model = load_eval_model(name, device=device).net
    from plmrun.data.corpus import resolve_dataset
    dataset = resolve_dataset(args.dataset)
    cfg = EvalConfig()
    if args.eval_seed is not None:
        cfg.seed = args.eval_seed
    source = open_dataset(dataset, args.split)
    with torch.inference_mode():
        metrics = evaluate(model, source, cfg, subset=args.subset, device=device, token_budget=args.token_budget)
    metrics = {"model": name, "split": args.split, "subset": args.subset, "eval_seed": cfg.seed, **metrics}
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


# ------------------------------------------------------------------ config
def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config (YAML) or the option table")
    p.add_argument("--config", help="YAML config file or shipped config name")
    p.add_argument("--markdown", action="store_true", help="print the option table (README) instead")
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plmrun", description="Speedrun pretraining of protein language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from plmrun.data.cli import add_data_commands
    data = sub.add_parser("data", help="prepare, split, download, inspect datasets")
    add_data_commands(data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True))
    _add_train(sub)
    _add_eval(sub)
    from plmrun.eval.export import add_export_command
    from plmrun.eval.embed import add_embed_command
    from plmrun.eval.probe import add_probe_command
    from plmrun.eval.zeroshot import add_zeroshot_command
    from plmrun.eval.report import add_report_command
    for add in (add_export_command, add_embed_command, add_probe_command, add_zeroshot_command, add_report_command):
        add(sub)
    from plmrun.train.record import add_record_command
    add_record_command(sub)
    _add_config(sub)
    from plmrun.train.sweep import add_sweep_command
    add_sweep_command(sub)
    from plmrun.train.plan import add_plan_command
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
    except (PlmrunError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # commands that stop with a message (SystemExit("...")) get the same one-line form
        if isinstance(e.code, str):
            print(f"error: {e.code}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
