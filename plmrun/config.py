"""Typed run configuration: dataclasses, YAML loading, CLI overrides, validation in one place.

A run is a pure function of (config, seed, data). Every key below is read by something; the
option table in docs/reference/config.md is generated from these dataclasses (`plmrun config --markdown`) and a
test checks it has not drifted. Unknown keys, wrong types and impossible combinations are
rejected with one message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import PlmrunError
from .model.config import POSITION_LIMIT, ModelConfig, model_config_problems


class ConfigError(PlmrunError, ValueError):
    """A configuration problem the user can fix; the message names the key."""


def max_length_phases(d: DataConfig) -> list[tuple[int, int]]:
    """[(first step, crop length in tokens), ...]: data.max_length_schedule, or data.max_length from step 0."""
    return [(int(s), int(n)) for s, n in d.max_length_schedule] or [(0, d.max_length)]


@dataclass
class DataConfig:
    dataset: str = "bundled"
    "Prepared dataset directory (plmrun data prepare), or 'bundled' for the shipped Swiss-Prot corpus."
    train_split: str = "train"
    "Split used for training."
    valid_split: str = "valid"
    "Split used for evaluation during training."
    test_split: str = "test"
    "Split evaluated at the end of training when eval.final_test is on."
    max_length: int = 512
    "Longest sequence in tokens (incl. <cls>/<eos>); longer ones get a random crop window."
    max_length_schedule: list[list[int]] = field(default_factory=list)
    (
        "Crop length by step, [[step, max_length], ...] from step 0 (ESM C: [[0, 512], [N, 2048]]); replaces "
        "data.max_length when set; each switch starts the next epoch with the new crops."
    )
    token_budget: int = 2048
    "Tokens per micro-batch (packed, padded only at the tail)."
    prefetch: int = 4
    "Micro-batches prepared ahead by background threads (0 = synchronous)."
    num_workers: int = 1
    "Background threads that pack and mask micro-batches."


@dataclass
class MaskingConfig:
    objective: Literal["mlm", "diffusion", "mlm_to_diffusion"] = "mlm"
    "Training objective: BERT-style MLM, masked diffusion, or a linear schedule from MLM to diffusion."
    mask_rate: float = 0.3
    "MLM: fraction of residues selected as targets (at step 0 when ramped; ESM-2: 0.15, the seed 0.2)."
    mask_rate_end: float | None = None
    "MLM: mask rate reached after ramp_steps (None = constant)."
    ramp_steps: int = 0
    "Steps over which mask_rate ramps to mask_rate_end, or MLM turns into diffusion."
    mask_token_frac: float = 0.8
    (
        "MLM: fraction of targets replaced by <mask> (ESM-2: 0.8; 1.0 = all, which hurts embeddings: "
        "docs/results/recipe.md)."
    )
    random_token_frac: float = 0.1
    "MLM: fraction of targets replaced by a random amino acid, the rest stay unchanged (ESM-2: 0.1)."
    diffusion_eps: float = 1e-3
    "Masked diffusion: t ~ U(eps, 1]."


@dataclass
class OptimConfig:
    optimizer: Literal["muon", "adamw"] = "muon"
    "muon: Muon for hidden matrices + Adam groups; adamw: one AdamW over all parameters (ESM-2 recipe)."
    lr: float = 4e-4
    "adamw: learning rate."
    lr_hidden: float = 0.0035
    "muon: learning rate of hidden 2-D matrices."
    lr_embed: float = 0.0035
    "muon: Adam learning rate of embeddings (token and value embeddings)."
    lr_head: float = 0.0014
    "muon: Adam learning rate of the LM head."
    lr_scalar: float = 0.0035
    "muon: Adam learning rate of scalars/vectors (lambdas, skip weights, norms, biases)."
    betas: tuple[float, float] = (0.8, 0.95)
    "Adam betas (ESM-2 recipe: 0.9, 0.98)."
    eps: float = 1e-8
    "Adam epsilon."
    weight_decay: float = 0.0
    "Decoupled weight decay (matrices only for muon groups; all but norms/biases for adamw)."
    muon_momentum: float = 0.95
    "Muon Nesterov momentum after warm-up."
    muon_momentum_start: float = 0.85
    "Muon momentum at step 0."
    muon_momentum_warmup_steps: int = 300
    "Steps over which Muon momentum rises to muon_momentum."
    ns_steps: int = 5
    "Newton-Schulz iterations."
    ns_coefficients: Literal["quintic", "polar_express", "polar_express_3"] = "quintic"
    (
        "Newton-Schulz coefficients: quintic (Keller Jordan's, the same each step), polar_express (per step, "
        "ns_steps=5) or polar_express_3 (fitted for this model's spectrum, ns_steps=3)."
    )
    ns_gram: bool = False
    (
        "Newton-Schulz on the small-side Gram matrix for matrices >= 2x wider than tall (MLP): same iteration, fewer "
        "FLOPs (fp32-exact; bf16 rounds more)."
    )
    ns_per_head: bool = False
    "Orthogonalise each attention head's rows of Q/K/V on its own (H small matrices instead of one square one)."
    ns_every: int = 1
    (
        "Recompute Muon's orthogonalised update every k steps and reuse it in between (1 = every step; 2 cost +0.057 "
        "val loss on the default run, benchmarks/results/optimizer_share.md)."
    )
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "wsd"
    "LR schedule after warm-up: cosine, warmup-stable-decay, linear decay, or constant."
    warmup: float = 0.0
    "Warm-up: steps if >= 1, fraction of max_steps if < 1."
    cooldown: float = 0.4
    "wsd: length of the final linear cool-down (steps if >= 1, else fraction of max_steps)."
    final_lr_ratio: float = 0.0
    "LR at the end as a fraction of the peak (ESM-2 recipe: 0.1)."
    grad_clip: float = 0.0
    "Clip the global gradient norm to this value (0 = off)."
    auto_clip_percentile: float = 0.0
    "Auto-clip to this percentile of the grad-norm history (0 = off)."
    auto_clip_history: int = 100
    "Grad norms kept for auto-clip."


@dataclass
class TrainConfig:
    max_steps: int = 320
    "Optimizer steps (the default run: 320 steps of 2,048 tokens, 655k tokens)."
    grad_accum: int = 1
    "Micro-batches per rank per step."
    global_batch_tokens: int = 0
    (
        "Tokens per optimizer step over all ranks (the seed's --batch_size; 0 = off): grad_accum is derived as "
        "global_batch_tokens / (data.token_budget × world size), so one YAML gives the same optimisation on 1, 4 or 8 "
        "GPUs; leave train.grad_accum at 1."
    )
    max_time: float = 0.0
    (
        "Wall-clock budget in seconds for training and in-training evals, across resumes (0 = none): when spent, the "
        "run evals, checkpoints, runs the final eval and finishes with stopped=max_time. The LR schedule stays "
        "step-based (over train.max_steps)."
    )
    seed: int = 0
    "Seed for init, data order, crops and masks."
    device: Literal["auto", "cpu", "cuda"] = "auto"
    "Where to train (auto = cuda if available)."
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    (
        "bf16 autocast with fp32 master weights, or fp32 (auto = bf16 where bf16 matmuls are native: CUDA, AVX-512/AMX"
        " CPUs)."
    )
    compile: bool = False
    "torch.compile each block (static shapes) and, on CPU, the bf16 attention kernel (compiling takes time at start)."
    fp8: bool = False
    (
        "Float8 matmuls in the blocks' linear layers (torchao, dynamic per-tensor scales; needs bf16 precision and "
        "pip install 'plmrun[fp8]'). For H100-class GPUs, with train.compile=true; on a CPU float8 is emulated "
        "(slower than bf16: for checks only)."
    )
    threads: int = 0
    "torch intra-op threads on CPU (0 = all cores)."
    eval_every: int = 80
    "Evaluate on the eval subset every N steps (0 = only at the end)."
    report_at_val_losses: list[float] = field(default_factory=lambda: [2.9, 2.85, 2.8, 2.75, 2.7])
    "Record time and tokens at the first eval reaching each of these val losses."
    stop_at_val_loss: float | None = None
    "End the run at the first eval at or below this loss."
    dense_eval_every: int = 0
    (
        "Near a target, also evaluate every N steps (0 = off): while the best val loss is at most "
        "train.dense_eval_margin above a report_at_val_losses or stop_at_val_loss level not yet reached, so the "
        "crossing is known to N steps."
    )
    dense_eval_margin: float = 0.02
    "How close (nats) the best val loss must be to an unreached target for train.dense_eval_every to apply."
    log_every: int = 10
    "Write a training-metrics line every N steps."
    checkpoint_every: int = 0
    "Save a resumable checkpoint every N steps (0 = only at the end and on SIGTERM); the last step is always saved."
    keep_latest_k: int = 2
    "Checkpoints kept."
    cost_per_hour: float = 0.0
    "Hardware price in $/hour for the cost estimate in summary.json."
    loss_spike: Literal["ignore", "warn", "skip", "abort"] = "warn"
    (
        "A step whose loss exceeds loss_spike_factor × the mean of the last loss_spike_window losses: log it, skip its"
        " update, or stop."
    )
    loss_spike_factor: float = 2.0
    "Spike threshold as a multiple of the recent mean loss (> 1)."
    loss_spike_window: int = 20
    "Recent non-spike steps averaged for the spike threshold."
    loss_spike_max_skips: int = 10
    "loss_spike=skip: stop after this many skipped updates in a row (the loss has shifted, not spiked)."
    divergence_factor: float = 2.0
    (
        "Stop (exit 2) when the train loss stays above this multiple of ln(vocab), the loss of uniform guessing, for "
        "divergence_steps steps in a row (0 = never)."
    )
    divergence_steps: int = 10
    "Consecutive steps above the divergence threshold that stop the run."
    divergence_margin: float = 0.25
    (
        "Stop (exit 2) at an eval whose loss is more than this many nats above the unigram baseline (the training "
        "split's residue frequencies; guessing uniformly over the vocabulary is about 0.6 above it on proteins), once "
        "the run is past its LR warm-up, train.divergence_steps steps and half of train.max_steps (at most 1,000 "
        "steps), before its last step (0 = never)."
    )


@dataclass
class EvalConfig:
    seed: int = 1234
    "Seed of the fixed evaluation masks and crop windows."
    mask_rate: float = 0.15
    "Fraction of residues masked (all with <mask>) in the eval protocol."
    max_length: int = 1024
    "Eval window in tokens (1022 residues): see eval.windows for sequences that are longer."
    windows: Literal["crop", "chunk"] = "crop"
    (
        "Sequences longer than eval.max_length: 'crop' scores one fixed window, 'chunk' scores every consecutive "
        "window (the SpeedrunningPLMs protocol: chunks of 256)."
    )
    subset: int = 256
    "Valid sequences used by in-training evals (the first N; 0 = all)."
    token_budget: int = 8192
    "Tokens per eval micro-batch (results do not depend on it)."
    final_full: bool = True
    "Evaluate the whole valid split at the end of training."
    final_test: bool = False
    (
        "Also evaluate the whole data.test_split at the end of training (same protocol), recorded as final_test in "
        "summary.json and metrics."
    )


@dataclass
class LoggingConfig:
    run_root: str = "runs"
    "Directory that holds run directories."
    name: str | None = None
    (
        "Run directory name (default: <timestamp>-<arch>, or the newest unfinished run with the same config, "
        "continued); an existing one is never reused silently."
    )
    progress: bool = True
    "Show a progress bar."
    tensorboard: bool = False
    "Also log metrics to TensorBoard."
    wandb: bool = False
    "Also log metrics to Weights & Biases (WANDB_MODE=offline works)."
    wandb_project: str = "plmrun"
    "W&B project name."
    push_to_hub: str | None = None
    (
        "Hub repo (user/name) the finished run is exported to and uploaded to, as `plmrun export --push-to-hub` (token"
        " from HF_TOKEN); a failed upload leaves the run finished."
    )


@dataclass
class DistConfig:
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    "Data parallelism under torchrun: auto = ddp; fsdp = FSDP2 fully_shard per block + root."
    activation_checkpointing: bool = False
    "Recompute block activations in backward."
    meta_init: bool = False
    "Build the model on the meta device and initialise it after sharding (large models: no full copy per rank)."


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------- coercion and validation
def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        what = "a finite number" if number is not None else "a number"
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - programming error


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    classes = _section_classes()
    if section not in classes:
        raise ConfigError(f"{where}: unknown section {section!r} (sections: {', '.join(classes)})")
    set_fields(getattr(cfg, section), {key: value}, where, prefix=f"{section}.")


def merge_dict(cfg: Config, data: dict, where: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section == "base":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for key, value in values.items():
            _apply(cfg, section, key, value, where)


def load_yaml(path: str | Path, cfg: Config | None = None, _seen: tuple = ()) -> Config:
    """Load a YAML config; `base: other.yaml` (relative to the file) is applied first."""
    path = Path(path)
    cfg = cfg or Config()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular 'base:' reference")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    if "base" in data:
        load_yaml(resolve_config_path(data["base"], relative_to=path.parent), cfg, _seen + (path.resolve(),))
    merge_dict(cfg, data, str(path))
    return cfg


def config_dir() -> Path:
    """The shipped configs/ directory (inside the package, so non-editable installs have it)."""
    return Path(__file__).parent / "configs"


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A path, or the name of a shipped config (`esm2_8m` -> plmrun/configs/esm2_8m.yaml)."""
    p = Path(name)
    candidates = [p]
    if relative_to is not None:
        candidates.insert(0, relative_to / p)
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    candidates.append(config_dir() / stem)
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{name}: no such config file (shipped: {', '.join(list_shipped_configs())})")


def list_shipped_configs() -> list[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def read_flags(args: list[str], *, dotted: bool = True) -> list[tuple[str, Any]]:
    """The one flag grammar: `--name=value` or `--name value` -> [(name, value read as YAML)], dashes in
    names read as underscores. `dotted` names are `section.key` (train and its commands); plain `key` names
    are a single section's (finetune)."""
    shape = "--section.key=value" if dotted else "--key=value"
    out, i = [], 0
    while i < len(args):
        a = args[i]
        name = a[2:].split("=", 1)[0]
        if not a.startswith("--") or not name or (dotted and "." not in name):
            raise ConfigError(f"unrecognised argument {a!r} (options look like {shape})")
        if "=" in a:
            value = a.split("=", 1)[1]
        elif i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ConfigError(f"{a}: missing value (write {a}=VALUE; booleans too: {a}=true)")
        else:
            value, i = args[i + 1], i + 1
        out.append((name.replace("-", "_"), _yaml_value(value)))
        i += 1
    return out


def _yaml_value(value: str) -> Any:
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def set_fields(obj, values: dict, where: str, prefix: str = "") -> None:
    """Set dataclass fields from a mapping, each value coerced to its declared type; an unknown key or a
    badly typed value is one ConfigError naming `where` and the key."""
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            close = [k for k in hints if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(prefix + k for k in close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {prefix}{key}{hint}")
        setattr(obj, key, _coerce(value, hints[key], f"{where}: {prefix}{key}"))


def build_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    cfg = load_yaml(resolve_config_path(config_file)) if config_file else Config()
    for name, value in read_flags(overrides or []):
        section, key = name.split(".", 1)
        _apply(cfg, section, key, value, f"--{name}")
    validate(cfg)
    return cfg


def config_from_dict(data: dict, where: str = "config") -> Config:
    cfg = Config()
    merge_dict(cfg, data, where)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- cross-field validation
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# ---------------------------------------------------------------- value rules shared by keys and flags
MIN_WINDOW = 3
"Fewest tokens a window can hold: <cls>, one residue, <eos>."


def require(ok: bool, name: str, value: Any, need: str) -> None:
    """A broken rule as one line, `NAME VALUE: NEED`. NAME is the config key (eval.max_length) or the
    command-line flag that set the value (--max-length), so every command words a range the same way."""
    if not ok:
        raise ConfigError(f"{name} {value}: {need}")


def check_window(max_length: int, name: str) -> None:
    """A forward window in tokens incl. <cls>/<eos> (eval, embed, probe, zeroshot, finetune)."""
    require(max_length >= MIN_WINDOW, name, max_length, f"must be >= {MIN_WINDOW} (<cls>, a residue, <eos>)")


def check_mask_rate(rate: float, name: str) -> None:
    require(0 < rate < 1, name, rate, "must be in (0, 1), e.g. 0.15 (the ESM-2 protocol)")


def check_at_least(value: float, minimum: float, name: str, note: str = "") -> None:
    """A count or size with a lower bound; `note` says what the bound means, e.g. ' (0 = all)'."""
    require(value >= minimum, name, value, f"must be >= {minimum}{note}")


def check_budget_covers(
    token_budget: int, max_length: int, budget_name: str, length_name: str, window: str = "window"
) -> None:
    """A batch must hold one whole window: the budget is at least max_length (results do not depend on it)."""
    if token_budget < max_length:
        raise ConfigError(
            f"{budget_name} {token_budget} is below the {window} of {max_length} tokens "
            f"({length_name}): use {budget_name} >= {max_length} (results do not depend on it) "
            f"or a smaller {length_name}"
        )


EVAL_FLAGS = {
    "seed": "--eval-seed",
    "mask_rate": "--mask-rate",
    "max_length": "--max-length",
    "token_budget": "--token-budget",
}
"`plmrun eval`'s flags that set EvalConfig keys (validate_eval names them in its errors)."


def validate_eval(e: EvalConfig, names: dict[str, str] | None = None) -> None:
    """The eval protocol's ranges, for a config's eval section and for `plmrun eval`'s flags alike;
    `names` maps a key to the flag that set it, so the error names what the user typed."""
    name = lambda key: (names or {}).get(key, f"eval.{key}")
    check_mask_rate(e.mask_rate, name("mask_rate"))
    check_window(e.max_length, name("max_length"))
    check_budget_covers(e.token_budget, e.max_length, name("token_budget"), name("max_length"), "eval window")
    check_at_least(e.subset, 0, name("subset"), " (0 = all)")


def _validate_schedule(d: DataConfig, m: ModelConfig) -> None:
    """data.max_length_schedule: [step, length] pairs from step 0, steps increasing, lengths in [3, token_budget]
    and within the preset's position limit."""
    key = "data.max_length_schedule"
    sched = d.max_length_schedule
    _check(all(len(p) == 2 for p in sched), f"{key}: each entry must be [step, max_length], got {sched!r}")
    _check(
        not sched or sched[0][0] == 0,
        f"{key}: the first entry must start at step 0, got {sched[0] if sched else None!r}",
    )
    steps = [p[0] for p in sched]
    _check(all(a < b for a, b in zip(steps, steps[1:])), f"{key}: steps must increase, got {steps}")
    for step, n in sched:
        _check(n >= 3, f"{key}: max_length {n} at step {step} must be >= 3 (<cls>, one residue, <eos>)")
        _check(d.token_budget >= n, f"data.token_budget ({d.token_budget}) must be >= {key} length {n} (step {step})")
    limit = POSITION_LIMIT.get(m.arch)
    longest = max(n for _, n in max_length_phases(d))
    what = key if sched else "data.max_length"
    _check(
        limit is None or longest <= limit,
        f"{what}: {longest} tokens exceed the model.arch={m.arch} position limit of {limit}; use <= {limit} "
        "or a rotary preset (speedrun, esmc), which takes any length",
    )


def validate(cfg: Config) -> Config:
    m, d, k, o, t, e = cfg.model, cfg.data, cfg.masking, cfg.optim, cfg.train, cfg.eval
    problems = model_config_problems(m)
    _check(not problems, problems[0] if problems else "")
    check_window(d.max_length, "data.max_length")
    _check(
        d.token_budget >= d.max_length,
        f"data.token_budget ({d.token_budget}) must be >= data.max_length ({d.max_length})",
    )
    _validate_schedule(d, m)
    _check(d.prefetch >= 0 and d.num_workers >= 1, "data.prefetch must be >= 0 and data.num_workers >= 1")
    _check(0 < k.mask_rate < 1, f"masking.mask_rate must be in (0, 1), got {k.mask_rate}")
    _check(k.mask_rate_end is None or 0 < k.mask_rate_end < 1, "masking.mask_rate_end must be in (0, 1)")
    _check(
        k.mask_token_frac >= 0 and k.random_token_frac >= 0 and k.mask_token_frac + k.random_token_frac <= 1,
        "masking: mask_token_frac + random_token_frac must be <= 1",
    )
    _check(0 < k.diffusion_eps < 1, "masking.diffusion_eps must be in (0, 1)")
    _check(k.ramp_steps >= 0, "masking.ramp_steps must be >= 0")
    _check(
        not (k.objective == "mlm_to_diffusion" and k.ramp_steps == 0),
        "masking.objective=mlm_to_diffusion needs masking.ramp_steps > 0",
    )
    _check(
        not (k.mask_rate_end is not None and k.ramp_steps == 0), "masking.mask_rate_end needs masking.ramp_steps > 0"
    )
    for name in ("lr", "lr_hidden", "lr_embed", "lr_head", "lr_scalar"):
        _check(getattr(o, name) >= 0, f"optim.{name} must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas must be in [0, 1)")
    _check(0 <= o.muon_momentum < 1 and 0 <= o.muon_momentum_start < 1, "optim: Muon momenta must be in [0, 1)")
    _check(o.ns_steps >= 1, "optim.ns_steps must be >= 1")
    _check(
        o.ns_coefficients != "polar_express" or o.ns_steps == 5,
        "optim.ns_coefficients=polar_express is a 5-step schedule: set optim.ns_steps=5 (or use quintic)",
    )
    _check(
        o.ns_coefficients != "polar_express_3" or o.ns_steps == 3,
        "optim.ns_coefficients=polar_express_3 is a 3-step schedule: set optim.ns_steps=3 (or use quintic)",
    )
    _check(o.ns_every >= 1, "optim.ns_every must be >= 1 (1 = orthogonalise every step)")
    _check(o.muon_momentum_warmup_steps >= 0, "optim.muon_momentum_warmup_steps must be >= 0")
    _check(o.warmup >= 0 and o.cooldown >= 0, "optim.warmup and optim.cooldown must be >= 0")
    _check(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio must be in [0, 1]")
    _check(o.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 = off)")
    _check(0 <= o.auto_clip_percentile <= 100, "optim.auto_clip_percentile must be in [0, 100]")
    _check(o.auto_clip_history >= 1, "optim.auto_clip_history must be >= 1")
    _check(t.max_steps >= 1, "train.max_steps must be >= 1")
    warm = o.warmup if o.warmup >= 1 else o.warmup * t.max_steps
    cool = (o.cooldown if o.cooldown >= 1 else o.cooldown * t.max_steps) if o.schedule == "wsd" else 0
    _check(
        warm + cool <= t.max_steps,
        f"optim: warmup ({warm:g} steps) + cooldown ({cool:g} steps) exceed train.max_steps ({t.max_steps})",
    )
    _check(t.grad_accum >= 1, "train.grad_accum must be >= 1")
    _check(t.global_batch_tokens >= 0, f"train.global_batch_tokens must be >= 0 (0 = off), got {t.global_batch_tokens}")
    _check(
        not (t.global_batch_tokens and t.grad_accum != 1),
        f"train.global_batch_tokens ({t.global_batch_tokens}) derives grad_accum from the world size; "
        f"leave train.grad_accum at 1 (got {t.grad_accum})",
    )
    _check(
        t.global_batch_tokens % d.token_budget == 0,
        f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of data.token_budget "
        f"({d.token_budget})",
    )
    _check(t.max_time >= 0, f"train.max_time must be >= 0 seconds (0 = no limit), got {t.max_time}")
    _check(t.eval_every >= 0 and t.log_every >= 1, "train.eval_every must be >= 0 and train.log_every >= 1")
    _check(t.dense_eval_every >= 0, "train.dense_eval_every must be >= 0")
    _check(
        not t.dense_eval_every or 0 < t.dense_eval_every < t.eval_every,
        f"train.dense_eval_every ({t.dense_eval_every}) needs train.eval_every > it (now {t.eval_every}):"
        " it refines the regular evals near a target",
    )
    _check(t.dense_eval_margin > 0, "train.dense_eval_margin must be > 0")
    _check(t.checkpoint_every >= 0 and t.keep_latest_k >= 1, "train.checkpoint_every >= 0, train.keep_latest_k >= 1")
    _check(t.cost_per_hour >= 0, "train.cost_per_hour must be >= 0")
    _check(t.threads >= 0, "train.threads must be >= 0")
    _check(
        not (t.fp8 and t.precision == "fp32"),
        "train.fp8=true runs the other matmuls in bf16: set train.precision=bf16 or auto, not fp32",
    )
    _check(t.loss_spike_factor > 1, f"train.loss_spike_factor must be > 1, got {t.loss_spike_factor}")
    _check(t.loss_spike_window >= 1, "train.loss_spike_window must be >= 1")
    _check(t.loss_spike_max_skips >= 1, f"train.loss_spike_max_skips must be >= 1, got {t.loss_spike_max_skips}")
    _check(
        t.divergence_factor == 0 or t.divergence_factor > 1,
        f"train.divergence_factor must be 0 (off) or > 1, got {t.divergence_factor}",
    )
    _check(t.divergence_steps >= 1, f"train.divergence_steps must be >= 1, got {t.divergence_steps}")
    _check(t.divergence_margin >= 0, f"train.divergence_margin must be >= 0 nats (0 = off), got {t.divergence_margin}")
    validate_eval(e)
    limit = POSITION_LIMIT.get(m.arch)
    _check(
        limit is None or e.max_length <= limit,
        f"eval.max_length: {e.max_length} tokens exceed the model.arch={m.arch} position limit of {limit}",
    )
    hub = cfg.logging.push_to_hub
    _check(
        hub is None or (hub.count("/") == 1 and all(hub.split("/"))),
        f"logging.push_to_hub must be a Hub repo id like user/name, got {hub!r}",
    )
    return cfg


# ---------------------------------------------------------------- documentation
def option_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every option, from the dataclasses and their docstrings."""
    rows = []
    for section, cls in _section_classes().items():
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        inst = cls()
        for f in dataclasses.fields(cls):
            rows.append(
                (f"{section}.{f.name}", _type_name(hints[f.name]), repr(getattr(inst, f.name)), docs.get(f.name, ""))
            )
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) via the class source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs


def options_markdown() -> str:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, tp, default, doc in option_rows():
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc} |")
    return "\n".join(lines)
