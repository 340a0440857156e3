"""`plmrun finetune` settings: one typed dataclass, read from YAML and `--key value` flags, checked in
`validate` (the one place), each problem one ConfigError line naming the key."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from plmrun.config import ConfigError, read_flags, set_fields


@dataclass
class FinetuneConfig:
    model: str = ""
    "Model to fine-tune: run directory, checkpoint, saved model, export, ESM-2/ESM C folder or Hub name."
    task: str = "solubility"
    "A bundled probe task (localisation, secondary_structure, solubility) or a CSV/TSV table (.gz/.xz allowed)."
    kind: Literal["auto", "classification", "regression", "residue_classification"] = "auto"
    "Task kind; auto: the bundled task's, classification for a table."
    sequence_column: str = "sequence"
    "Table: column of sequences."
    label_column: str = "label"
    "Table: column of labels (residue_classification: one label character per residue)."
    split_column: str = "split"
    "Table: column of train/valid/test; without it rows are split 80/10/10 by a hash of the sequence."
    method: Literal["lora", "full"] = "lora"
    "lora: low-rank adapters on the attention projections (needs peft); full: every weight trains."
    lora_rank: int = 8
    "LoRA rank."
    lora_alpha: float = 16.0
    "LoRA scaling numerator (scale = alpha / rank)."
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    "Linear layers (by their last name) that get adapters."
    lr: float = 1e-3
    "AdamW learning rate (constant after warm-up), for the task head and the trained weights."
    weight_decay: float = 0.0
    "AdamW decoupled weight decay."
    warmup: int = 10
    "Warm-up steps (linear)."
    max_steps: int = 300
    "Upper bound on optimizer steps."
    eval_every: int = 25
    "Steps between validation passes (each also saves a checkpoint)."
    patience: int = 4
    "Stop after this many validation passes without improvement (0 = never stop early)."
    token_budget: int = 2048
    "Tokens per packed training batch."
    max_length: int = 512
    "Training crop in tokens incl. <cls>/<eos> (random windows; evaluation averages over windows); 0 = whole sequences."
    max_train: int = 600
    "Training sequences (a deterministic hash-picked subset)."
    max_valid: int = 100
    "Validation sequences (early stopping)."
    max_test: int = 200
    "Test sequences (the same ones `plmrun probe --max-test` uses on a bundled task)."
    probe_seeds: int = 3
    "Seeds of the frozen-embedding logistic probe printed beside the result (0 = no probe)."
    seed: int = 0
    "Seed of the task head, adapters, batch order and crops."
    grad_accum: int = 1
    "Micro-batches per rank per step (torchrun: world size × grad_accum bins make one step's batch)."
    max_time: float = 0.0
    (
        "Wall-clock budget in seconds for training and validation, across resumes (0 = none): when spent, the run "
        "validates, checkpoints and finishes."
    )
    progress: bool = False
    "Show a progress bar instead of a line every 10 steps."
    tensorboard: bool = False
    "Also log metrics to TensorBoard (RUN/tb)."
    wandb: bool = False
    "Also log metrics to Weights & Biases."
    keep_latest_k: int = 2
    "Checkpoints kept."
    run_root: str = "runs/finetune"
    "Folder holding fine-tuning run directories."
    name: str = ""
    "Run directory name (default: <task>-<method>); rerunning the same config continues it."
    export: bool = True
    "Write the fine-tuned model (LoRA merged) as a Hugging Face folder RUN/hf."
    drop_bad_labels: bool = False
    "Table: drop rows whose label is missing (empty, NA, nan) and print how many; off: refuse them, naming their lines."
    drop_leaks: bool = False
    (
        "Table: drop valid/test rows whose sequence is also in an earlier split (train, then valid) and print how "
        "many; off: refuse the leak, naming the lines."
    )


def to_dict(cfg: FinetuneConfig) -> dict:
    return asdict(cfg)


def apply(cfg: FinetuneConfig, values: dict, where: str) -> FinetuneConfig:
    """Set fields from a mapping (config.set_fields: the one coercion); an unknown key is one ConfigError
    listing the keys there are."""
    keys = [f.name for f in fields(FinetuneConfig)]
    for key in values:
        if key not in keys:
            raise ConfigError(f"{where}: unknown finetune key {key!r} (keys: {', '.join(keys)})")
    set_fields(cfg, values, where)
    return cfg


def build(model: str | None, config_file: str | None, flags: list[str]) -> FinetuneConfig:
    """Defaults, then the YAML file, then the flags, then MODEL; validated."""
    cfg = FinetuneConfig()
    if config_file:
        try:
            data = yaml.safe_load(Path(config_file).read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{config_file}: expected a mapping of finetune keys")
        apply(cfg, data, config_file)
    apply(cfg, dict(read_flags(flags, dotted=False)), "command line")
    if model:
        cfg.model = model
    return validate(cfg)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Every range and cross-field rule, one line each (the one validation place)."""

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"finetune: {msg}")

    check(bool(cfg.model), "no model: give MODEL (a run directory, model folder or Hub name)")
    check(cfg.lora_rank >= 1, f"lora_rank {cfg.lora_rank}: must be >= 1")
    check(cfg.lora_alpha > 0, f"lora_alpha {cfg.lora_alpha}: must be > 0")
    check(bool(cfg.lora_targets), "lora_targets: name at least one linear layer, e.g. [q, v]")
    check(cfg.lr > 0, f"lr {cfg.lr}: must be > 0")
    check(cfg.weight_decay >= 0, f"weight_decay {cfg.weight_decay}: must be >= 0")
    check(cfg.warmup >= 0, f"warmup {cfg.warmup}: must be >= 0")
    check(cfg.max_steps >= 1, f"max_steps {cfg.max_steps}: must be >= 1")
    check(cfg.eval_every >= 1, f"eval_every {cfg.eval_every}: must be >= 1")
    check(cfg.patience >= 0, f"patience {cfg.patience}: must be >= 0 (0 = never stop early)")
    check(
        cfg.max_length == 0 or cfg.max_length >= 3,
        f"max_length {cfg.max_length}: must be >= 3 (<cls>, a residue, <eos>) or 0 (whole sequences)",
    )
    check(
        cfg.max_length == 0 or cfg.token_budget >= cfg.max_length,
        f"token_budget {cfg.token_budget} is below max_length {cfg.max_length}: raise it or lower max_length",
    )
    check(cfg.max_train >= 2, f"max_train {cfg.max_train}: must be >= 2")
    check(cfg.max_valid >= 1, f"max_valid {cfg.max_valid}: must be >= 1")
    check(cfg.max_test >= 1, f"max_test {cfg.max_test}: must be >= 1")
    check(cfg.probe_seeds >= 0, f"probe_seeds {cfg.probe_seeds}: must be >= 0")
    check(cfg.keep_latest_k >= 1, f"keep_latest_k {cfg.keep_latest_k}: must be >= 1")
    check(cfg.grad_accum >= 1, f"grad_accum {cfg.grad_accum}: must be >= 1")
    check(cfg.max_time >= 0, f"max_time {cfg.max_time}: must be >= 0 seconds (0 = no limit)")
    check("/" not in cfg.name and cfg.name not in (".", ".."), f"name {cfg.name!r}: a folder name, not a path")
    return cfg
