"""Parameter grouping and the one `Optimizers` object the trainer drives.

Groups come from the model: `model.parameter_kinds()` maps every trainable parameter name to
'embed', 'head', 'hidden' or 'scalar'. Weight decay (decoupled, scaled by the current LR) goes to
matrices only: parameters with ndim >= 2 whose kind is not 'scalar'.
  optimizer='muon':  Muon for 'hidden' (lr_hidden); AdamW groups for 'embed' (lr_embed),
                     'head' (lr_head) and 'scalar' (lr_scalar), betas/eps from the config.
  optimizer='adamw': one AdamW over everything at `lr` (the ESM-2 recipe).
Every group carries `name` and `base_lr`; `set_step(s)` sets lr = base_lr × lr_multiplier(s) and
the Muon momentum warm-up. Call it before each step (the trainer owns the step counter).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from plmrun.config import OptimConfig
from plmrun.errors import PlmrunError
from plmrun.optim.clip import clip_gradients
from plmrun.optim.muon import Muon
from plmrun.optim.schedule import lr_multiplier, muon_momentum

KINDS = ("embed", "head", "hidden", "scalar")


class OptimizerStateError(PlmrunError, ValueError):
    """Saved optimizer state that belongs to other optimizers (another optim.optimizer or model)."""


class Optimizers:
    """The optimizers of one model, stepped, scheduled, clipped and checkpointed together.

    A Stateful checkpoint part: state_dict() is FQN-keyed through torch's distributed state_dict API
    (so FSDP2-sharded state saves and loads with DCP), with the schedule step, the clip history and
    the parameter-group names that load_state_dict checks before touching any optimizer.
    """

    def __init__(
        self, optimizers: list[torch.optim.Optimizer], cfg: OptimConfig, max_steps: int, model: torch.nn.Module
    ):
        self.optimizers = optimizers
        self.cfg = cfg
        self.max_steps = max_steps
        self.model = model
        self.grad_norm_history: list[float] = []
        self.set_step(0)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def lr_multiplier(self, step: int) -> float:
        return lr_multiplier(step, self.cfg, self.max_steps)

    def set_step(self, step: int) -> None:
        self.schedule_step = step
        mult = self.lr_multiplier(step)
        mom = muon_momentum(step, self.cfg)
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * mult
            if g["name"] == "hidden":
                g["momentum"] = mom

    def current_lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.param_groups}

    def clip_gradients(self) -> tuple[float, float]:
        """Global grad norm (before clipping) and the threshold used (0 = none); see clip.py."""
        return clip_gradients(self.params, self.cfg, self.grad_norm_history)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def param_group_names(self) -> list[list[str]]:
        return [[g["name"] for g in opt.param_groups] for opt in self.optimizers]

    def check_param_groups(self, saved: list[list[str]]) -> None:
        """The guard: refuse state saved by other optimizers (its group names differ from this run's)."""
        if saved != self.param_group_names():
            raise OptimizerStateError(
                f"optimizer state has parameter groups {saved}, this run has "
                f"{self.param_group_names()} (different optim.optimizer or model?)"
            )

    def state_dict(self) -> dict:
        return {
            "param_group_names": self.param_group_names(),
            "optim": get_optimizer_state_dict(self.model, self.optimizers),
            "schedule_step": self.schedule_step,
            "grad_norm_history": list(self.grad_norm_history),
        }

    def load_state_dict(self, state: dict) -> None:
        self.check_param_groups(state["param_group_names"])
        set_optimizer_state_dict(self.model, self.optimizers, state["optim"])
        self.grad_norm_history = list(state["grad_norm_history"])
        self.set_step(state["schedule_step"])


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, max_steps: int, ns_dtype: torch.dtype = torch.bfloat16
) -> Optimizers:
    """Group `model`'s trainable parameters by kind and build the optimizers for `cfg`.

    ns_dtype: Newton–Schulz precision (bf16 is fast; float32 for exact fp32 comparisons).
    """
    named = _named_kinds(model)
    decay = {n: p.ndim >= 2 and kind != "scalar" for n, (p, kind) in named.items()}
    betas, eps = tuple(cfg.betas), cfg.eps

    def groups(names: list[str], name: str, lr: float) -> list[dict]:
        out = []
        for flag, suffix in ((True, ""), (False, "_no_decay")):
            params = [named[n][0] for n in names if decay[n] == flag]
            if params:
                out.append(
                    dict(
                        params=params,
                        name=name + suffix,
                        base_lr=lr,
                        lr=lr,
                        weight_decay=cfg.weight_decay if flag else 0.0,
                    )
                )
        return out

    if cfg.optimizer == "adamw":
        adam = groups(list(named), "adamw", cfg.lr)
        return Optimizers([torch.optim.AdamW(adam, betas=betas, eps=eps)], cfg, max_steps, model)
    by_kind = {k: [n for n, (_, kind) in named.items() if kind == k] for k in KINDS}
    for n in by_kind["hidden"]:
        if named[n][0].ndim != 2:
            raise ValueError(
                f"parameter {n!r} of shape {tuple(named[n][0].shape)} is 'hidden' but Muon "
                "needs 2-D matrices (fix model.parameter_kinds())"
            )
    adam = (
        groups(by_kind["embed"], "embed", cfg.lr_embed)
        + groups(by_kind["head"], "head", cfg.lr_head)
        + groups(by_kind["scalar"], "scalar", cfg.lr_scalar)
    )
    opts: list[torch.optim.Optimizer] = []
    if by_kind["hidden"]:
        heads = attention_heads(model) if cfg.ns_per_head else {}
        if cfg.ns_per_head and not heads:
            raise ValueError(
                f"optim.ns_per_head: {type(model).__name__} has no attention module with q/k/v "
                "Linear layers and a head count H"
            )
        whole = [n for n in by_kind["hidden"] if n not in heads]
        hidden = [dict(params=[named[n][0] for n in whole], name="hidden", base_lr=cfg.lr_hidden)] if whole else []
        for h in sorted(set(heads.values())):  # one group per head count, named "hidden" too (same schedule)
            hidden.append(
                dict(
                    params=[named[n][0] for n in by_kind["hidden"] if heads.get(n) == h],
                    name="hidden",
                    base_lr=cfg.lr_hidden,
                    ns_blocks=h,
                )
            )
        opts.append(
            Muon(
                hidden,
                lr=cfg.lr_hidden,
                momentum=cfg.muon_momentum,
                weight_decay=cfg.weight_decay,
                ns_steps=cfg.ns_steps,
                ns_dtype=ns_dtype,
                ns_coefficients=cfg.ns_coefficients,
                ns_gram=cfg.ns_gram,
                ns_every=cfg.ns_every,
            )
        )
    if adam:
        opts.append(torch.optim.AdamW(adam, betas=betas, eps=eps))
    return Optimizers(opts, cfg, max_steps, model)


def attention_heads(model: torch.nn.Module) -> dict[str, int]:
    """{parameter name: head count} of the Q, K and V weights of every attention module: one with an
    int head count `H` and q/k/v nn.Linear children (every plmrun architecture); their rows are the
    heads' blocks, so optim.ns_per_head orthogonalises each head's block on its own."""
    out = {}
    for prefix, mod in model.named_modules():
        if not isinstance(getattr(mod, "H", None), int):
            continue
        for child in ("q", "k", "v"):
            lin = getattr(mod, child, None)
            if isinstance(lin, torch.nn.Linear) and lin.weight.requires_grad:
                out[f"{prefix}.{child}.weight" if prefix else f"{child}.weight"] = mod.H
    return out


def _named_kinds(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """{name: (parameter, kind)} for trainable parameters, checked against parameter_kinds()."""
    if not hasattr(model, "parameter_kinds"):
        raise ValueError(
            f"{type(model).__name__} has no parameter_kinds(); pass the model itself, not a DDP/torch.compile wrapper"
        )
    kinds = model.parameter_kinds()
    params = dict(model.named_parameters())
    for name, kind in kinds.items():
        if name not in params:
            raise ValueError(f"parameter_kinds() names {name!r}, which is not a parameter of the model")
        if kind not in KINDS:
            raise ValueError(f"parameter {name!r} has kind {kind!r}; expected one of {', '.join(KINDS)}")
    out = {}
    for name, p in params.items():
        if not p.requires_grad:
            continue
        if name not in kinds:
            raise ValueError(f"parameter {name!r} has no kind in model.parameter_kinds()")
        out[name] = (p, kinds[name])
    return out
