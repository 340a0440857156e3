"""One way to load a model: from a run directory, a checkpoint, a saved model folder or a Hugging Face folder.

Saved model folder (`runs/<name>/model/`): `model.safetensors` (our parameter names) and
`config.json` = {"plmrun_format": 1, "model": <ModelConfig as a dict>}. A Hugging Face folder is
either an ESM-2 `EsmForMaskedLM` (config.json `model_type: esm`) -> the `esm2` preset, or a folder
exported by `plmrun export` (its config.json carries our ModelConfig under `plmrun_model`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from plmrun.config import ConfigError, ModelConfig, config_from_dict
from plmrun.errors import PlmrunError

FORMAT = 1


class ModelLoadError(PlmrunError, RuntimeError):
    """The path is not something a model can be loaded from; the message says what it is."""


def save_model_dir(out: Path, state_dict: dict, cfg: ModelConfig) -> None:
    """Write model.safetensors + config.json atomically (temp names, then rename)."""
    from dataclasses import asdict
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors sharing memory (tied embedding and decoder)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"plmrun_format": str(FORMAT)})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps({"plmrun_format": FORMAT, "model": asdict(cfg)}, indent=2))
    os.replace(tmp, out / "config.json")


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    try:
        return config_from_dict({"model": d}, where).model
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def esm_config_to_model_config(hf: dict) -> ModelConfig:
    """The esm2 preset with the shape of a Hugging Face EsmConfig."""
    if hf.get("position_embedding_type", "rotary") != "rotary":
        raise ModelLoadError("only rotary ESM models (ESM-2) are supported, not absolute-position ESM-1b")
    if hf.get("vocab_size", 33) != 33:
        raise ModelLoadError(f"ESM vocabulary size {hf.get('vocab_size')} is not the 33-token ESM-2 vocabulary")
    return model_config_from_dict({
        "arch": "esm2", "hidden_size": hf["hidden_size"], "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"], "expansion_ratio": hf["intermediate_size"] / hf["hidden_size"],
        "layer_norm_eps": hf.get("layer_norm_eps", 1e-5), "token_dropout": bool(hf.get("token_dropout", True)),
        "unet": False, "x0_lambdas": False, "value_embeddings": False, "qk_norm": False, "soft_logit_cap": 0.0,
    }, "Hugging Face config.json")


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Return (model in eval mode, ModelConfig) for a run dir, checkpoint, model folder or HF folder."""
    from plmrun.model.registry import build_model
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if (path / "model" / "config.json").is_file():  # a run directory
        path = path / "model"
    if path.name.startswith("step_") and (path / "train_state.json").is_file():  # a checkpoint
        run_cfg = path.parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise ModelLoadError(f"{path}: checkpoint without its run's config.yaml at {run_cfg}")
        cfg = model_config_from_dict(yaml.safe_load(run_cfg.read_text())["model"], str(run_cfg))
        model = build_model(cfg)
        load_checkpoint_weights(path, model)
        return model.to(device).eval(), cfg
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a run directory, checkpoint or model folder (no config.json)")
    meta = json.loads(cfg_file.read_text())
    weights = path / "model.safetensors"
    if "plmrun_format" in meta:
        cfg = model_config_from_dict(meta["model"], str(cfg_file))
        model = build_model(cfg)
        _load_strict(model, _load_safetensors(weights), weights)
    elif "plmrun_model" in meta:  # folder written by plmrun export
        cfg = model_config_from_dict(meta["plmrun_model"], str(cfg_file))
        model = build_model(cfg)
        sd = _load_safetensors(weights)
        if cfg.arch == "esm2":
            from plmrun.model.esm2 import load_hf_state_dict
            load_hf_state_dict(model, sd)
        else:
            _load_strict(model, {k.removeprefix("plm."): v for k, v in sd.items()}, weights)
    elif meta.get("model_type") == "esm":
        cfg = esm_config_to_model_config(meta)
        model = build_model(cfg)
        load_hf_weights_into(model, path)
    else:
        raise ModelLoadError(f"{cfg_file}: neither a plmrun model nor an ESM (model_type 'esm') config")
    return model.to(device).eval(), cfg


def load_hf_weights_into(model, path: str | Path) -> None:
    """Copy a Hugging Face EsmForMaskedLM folder's weights into an esm2-preset model of the same shape."""
    from plmrun.model.esm2 import load_hf_state_dict
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(_load_safetensors(f))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(f"{path}: no model.safetensors or pytorch_model.bin")
    load_hf_state_dict(model, sd)


def load_esmc_state_dict(model, sd: dict) -> None:
    """Copy an ESM C state dict (the esm package's `ESMC.state_dict()`) into an esmc-preset model."""
    from plmrun.model.esmc import esmc_state_dict_to_ours
    try:
        new = esmc_state_dict_to_ours(model, sd)
    except ValueError as e:
        raise ModelLoadError(f"ESM C weights: {e}") from None
    model.load_state_dict(new, strict=True)


def load_checkpoint_weights(path: Path, model) -> None:
    """Model weights of a training checkpoint (a DCP directory with a "model" entry) into a plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(path))
    set_model_state_dict(model, sd)


def _load_strict(model, sd: dict, where: Path) -> None:
    if model.cfg.arch == "esm2":  # esm2 folders saved before the block list was named `blocks`
        sd = {("blocks." + k[len("layers."):] if k.startswith("layers.") else k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{where}: weights do not match the architecture in config.json "
                             f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
