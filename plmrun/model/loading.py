"""The one model loader: a run directory, a checkpoint, a saved model, a `plmrun export` folder, a
Hugging Face ESM-2 folder or a Hub name -> our model (train --init-from-hf, eval, export, embed,
probe, zeroshot all come here).

Saved model folder (`runs/<name>/model/`): `model.safetensors` (our parameter names),
`config.json` = {"plmrun_format": 1, "model": <ModelConfig as a dict>} and `MANIFEST.json`
(checksums, written last). A Hugging Face folder is either an ESM-2 `EsmForMaskedLM` (config.json
`model_type: esm`, any layout transformers or the Hub writes: safetensors, sharded safetensors,
pytorch_model.bin) -> the `esm2` preset, or a folder written by `plmrun export` (its config.json
carries our ModelConfig under `plmrun_model`), or an ESM C folder as the `esm` package gets it from the
Hub (`data/weights/esmc_300m_2024_12_v0.pth`, `esmc_600m_...`) -> the `esmc` preset. Every damaged or
mismatching file is a one-line ModelLoadError naming the file (and the first mismatching key and shapes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml

from plmrun.atomic import atomic_path, write_text
from plmrun.config import ConfigError, config_from_dict
from plmrun.errors import ModelLoadError
from plmrun.manifest import MANIFEST, ManifestError, verify_manifest, write_manifest
from plmrun.model.config import ESMC_OFF, ModelConfig
from plmrun.safe_pickle import UnsafePickleError, torch_load_weights

FORMAT = 1
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"A Hub repo id (`facebook/esm2_t6_8M_UR50D`); tried only when no such local path exists."
ESMC_WEIGHTS = "data/weights/esmc_*.pth"
"""ESM C weights in an `esm` package Hub snapshot (EvolutionaryScale/esmc-300m-2024-12:
data/weights/esmc_300m_2024_12_v0.pth)."""
ESMC_HEAD_DIM = 64
"ESM C's head width (300M: 960 / 15 heads, 600M: 1152 / 18); the weights' shapes do not give the head count."


def save_model_dir(out: Path, state_dict: dict, cfg: ModelConfig) -> None:
    """Write model.safetensors + config.json atomically (temp names, then rename), the manifest last."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors sharing memory (tied embedding and decoder)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"plmrun_format": str(FORMAT)})
    write_text(out / "config.json", json.dumps({"plmrun_format": FORMAT, "model": asdict(cfg)}, indent=2))
    write_manifest(out, ["model.safetensors", "config.json"])


def model_config_from_dict(d: dict, where: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise ModelLoadError(f"{where}: no model settings (expected a mapping of ModelConfig fields)")
    try:
        return config_from_dict({"model": d}, where).model
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None


def esm_config_to_model_config(hf: dict, where: str = "Hugging Face config.json") -> ModelConfig:
    """The esm2 preset with the shape of a Hugging Face EsmConfig (its defaults where a key is absent)."""
    if hf.get("position_embedding_type", "absolute") != "rotary":
        raise ModelLoadError(f"{where}: only rotary ESM models (ESM-2) are supported, not absolute-position ESM-1b")
    if hf.get("vocab_size") != 33:
        raise ModelLoadError(
            f"{where}: ESM vocabulary size {hf.get('vocab_size')} is not the 33-token ESM-2 vocabulary"
        )
    if hf.get("emb_layer_norm_before") or hf.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"{where}: emb_layer_norm_before/hidden_act differ from ESM-2's; not an ESM-2 model")
    try:
        d = {
            "arch": "esm2",
            "hidden_size": hf["hidden_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": hf["num_attention_heads"],
            "expansion_ratio": hf["intermediate_size"] / hf["hidden_size"],
        }
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{where}: ESM config lacks a valid {e} entry") from None
    return model_config_from_dict(
        {
            **d,
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-12),  # EsmConfig's default
            "token_dropout": bool(hf.get("token_dropout", False)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "rope_base": float(hf.get("rope_theta", 10000.0)),
            "unet": False,
            "x0_lambdas": False,
            "value_embeddings": False,
            "qk_norm": False,
            "soft_logit_cap": 0.0,
        },
        where,
    )


def resolve_source(spec: str | Path) -> Path:
    """A local path as is; else a Hub repo id downloaded (or found in the cache) by snapshot_download."""
    path = Path(spec)
    if path.exists():
        return path
    if not HUB_NAME.match(str(spec)):
        raise ModelLoadError(f"{spec}: no such file or directory")
    from huggingface_hub import snapshot_download

    try:  # safetensors when the repo has them, else the pickled weights: never both
        folder = Path(
            snapshot_download(
                str(spec),
                allow_patterns=["config.json", "*.safetensors", MANIFEST, "*.safetensors.index.json", ESMC_WEIGHTS],
            )
        )
        if not any(folder.glob("*.safetensors")) and not any(folder.glob(ESMC_WEIGHTS)):
            folder = Path(
                snapshot_download(
                    str(spec), allow_patterns=["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
                )
            )
    except Exception as e:  # offline, unreachable, unknown repo, auth: all end here, as one line
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"{spec}: no such local folder, and it could not be fetched from the Hugging Face Hub "
            f"({why}); pass a local model folder"
        ) from None
    return folder


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(
            f"{path}: not valid JSON ({str(e).splitlines()[0]}); the file is damaged, re-save or re-download the model"
        ) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_weight_file(path: Path) -> dict:
    """One safetensors or pytorch_model.bin file; an unreadable one is a one-line error."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (listed in the folder's index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch_load_weights(path, path)
    except UnsafePickleError as e:  # objects that could run code: refused, not "damaged"
        raise ModelLoadError(str(e)) from None
    except Exception as e:  # SafetensorError, zip/pickle errors: the bytes are not a whole weight file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"{path}: unreadable weights ({why[:200]}); the file is truncated or damaged, re-save or re-download it"
        ) from None


def read_weights(folder: Path) -> tuple[dict, Path]:
    """Every tensor of a model folder and the file it came from (for messages).

    Sharded safetensors (model.safetensors.index.json), model.safetensors, other *.safetensors,
    sharded or single pytorch_model.bin, in that order of preference.
    """
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{folder / index}: no weight_map; the index is damaged")
            sd = {}
            for name in sorted(set(weight_map.values())):
                sd.update(_read_weight_file(folder / name))
            return sd, folder / index
        if (folder / single).is_file():
            return _read_weight_file(folder / single), folder / single
        if single == "model.safetensors" and (files := sorted(folder.glob("*.safetensors"))):
            sd = {}
            for f in files:
                sd.update(_read_weight_file(f))
            return sd, files[0]
    raise ModelLoadError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _verify(folder: Path) -> bool:
    """True if the folder's manifest checks out, False if it has none; damage is a one-line error."""
    try:
        return verify_manifest(folder)
    except ManifestError as e:
        raise ModelLoadError(f"{e}; re-save or re-export the model") from None


def _require_own_manifest(folder: Path, meta: dict) -> None:
    """A folder plmrun wrote (saved model, export, or a run's model/ or hf/) must carry its manifest: without
    one a damaged or altered file would load silently. Only foreign Hugging Face folders load without one."""
    in_run = folder.name in ("model", "hf") and (folder.parent / "config.yaml").is_file()
    if "plmrun_format" in meta or "plmrun_model" in meta or in_run:
        raise ModelLoadError(
            f"{folder}: no {MANIFEST}, which plmrun writes last into every model folder it saves "
            "or exports: the folder was not completely written or was altered since, so its files "
            "cannot be verified; re-save or re-export the model (only foreign Hugging Face and ESM C "
            "folders load without one)"
        )


def esmc_weights_file(folder: Path) -> Path | None:
    """The ESM C .pth of an `esm` package snapshot folder (ESMC_WEIGHTS), None when it has none."""
    files = sorted(folder.glob(ESMC_WEIGHTS)) if folder.is_dir() else []
    if len(files) > 1:
        raise ModelLoadError(
            f"{folder}: several ESM C weight files ({', '.join(f.name for f in files)}); pass a folder with one"
        )
    return files[0] if files else None


def esmc_config_from_state_dict(sd: dict, where: Path) -> ModelConfig:
    """The esmc preset with the shapes of an ESM C state dict (heads: hidden_size / ESMC_HEAD_DIM)."""
    if not isinstance(sd, dict):
        raise ModelLoadError(
            f"{where}: not an ESM C state dict: the file holds a {type(sd).__name__}, not a mapping "
            "of weights; pass the esm package's esmc_300m/esmc_600m weights"
        )

    def matrix(key: str) -> torch.Tensor:
        t = sd.get(key)
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            what = "is missing" if t is None else f"has shape {tuple(getattr(t, 'shape', ()))}, not a matrix"
            raise ModelLoadError(
                f"{where}: not an ESM C state dict: {key!r} {what}; pass the esm package's esmc_300m/esmc_600m weights"
            )
        return t

    D = int(matrix("embed.weight").shape[1])
    blocks = {k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")}
    if not blocks or not all(b.isdigit() for b in blocks):
        raise ModelLoadError(
            f"{where}: not an ESM C state dict: no 'transformer.blocks.<i>.' weights; pass the "
            "esm package's esmc_300m/esmc_600m weights"
        )
    layers = 1 + max(int(b) for b in blocks)
    F = int(matrix("transformer.blocks.0.ffn.1.weight").shape[0]) // 2
    if D % ESMC_HEAD_DIM:
        raise ModelLoadError(f"{where}: width {D} is not a multiple of ESM C's head width {ESMC_HEAD_DIM}")
    off = {k: False if isinstance(getattr(ModelConfig, k), bool) else 0 for k in ESMC_OFF}
    return model_config_from_dict(
        {
            **off,
            "arch": "esmc",
            "hidden_size": D,
            "num_layers": layers,
            "num_heads": D // ESMC_HEAD_DIM,
            "expansion_ratio": F / D,
            "qk_norm": "transformer.blocks.0.attn.q_ln.weight" in sd,
        },
        str(where),
    )


def read_model_folder(folder: Path) -> tuple[ModelConfig, dict, bool, Path]:
    """(config, weights, foreign, weights file) of a saved model, export, Hugging Face or ESM C folder.

    foreign: the weights are in another library's layout, the one the architecture's adapter reads
    (EsmForMaskedLM for esm2, `ESMC.state_dict()` for esmc); else in our parameter names.
    """
    if (pth := esmc_weights_file(folder)) is not None:
        sd = _read_weight_file(pth)
        return esmc_config_from_state_dict(sd, pth), sd, True, pth
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        if (folder / "checkpoints").is_dir():
            raise ModelLoadError(
                f"{folder}: the run has no saved model yet (no model/config.json); "
                f"pass one of its checkpoints, e.g. {folder / 'checkpoints'}/step_N"
            )
        raise ModelLoadError(f"{folder}: not a run directory, checkpoint or model folder (no config.json)")
    verified = _verify(folder)
    meta = _read_json(cfg_file)
    if not verified:
        _require_own_manifest(folder, meta)
    if "plmrun_format" in meta:
        cfg = model_config_from_dict(meta.get("model"), str(cfg_file))
        sd, where = read_weights(folder)
        return cfg, sd, False, where
    if "plmrun_model" in meta:  # folder written by plmrun export
        cfg = model_config_from_dict(meta["plmrun_model"], str(cfg_file))
        sd, where = read_weights(folder)
        if cfg.arch == "esm2":
            return cfg, sd, True, where
        return cfg, {k.removeprefix("plm."): v for k, v in sd.items()}, False, where
    if meta.get("model_type") == "esm":
        cfg = esm_config_to_model_config(meta, str(cfg_file))
        sd, where = read_weights(folder)
        return cfg, sd, True, where
    raise ModelLoadError(f"{cfg_file}: neither a plmrun model nor an ESM (model_type 'esm') config")


def _load_into(model, sd: dict, foreign: bool, where: Path, built_from: str) -> None:
    if foreign:
        _load_foreign(model, sd, where, model.cfg.arch)
    else:
        load_state_dict_checked(model, sd, where, built_from)


def _load_foreign(model, sd: dict, where: str | Path, arch: str) -> None:
    """Weights of the `arch` architecture in another library's layout, through its adapter."""
    from plmrun.model.registry import ARCHITECTURES

    if model.cfg.arch != arch:
        raise ModelLoadError(
            f"{where}: {ARCHITECTURES[arch].adapter.source} weights: needs an {arch}-preset model "
            f"(model.arch={arch}), not {type(model).__name__}"
        )
    try:
        type(model).adapter.load(model, sd)
    except ValueError as e:
        raise ModelLoadError(f"{where}: {e}") from None


def load_hf_state_dict(model, hf_state: dict, where: str | Path = "checkpoint") -> None:
    """Copy an EsmForMaskedLM state dict (rotary ESM-2, any layout) into an esm2-preset model; every mismatch
    is a one-line ModelLoadError starting with `where` and naming the first mismatching key and both shapes."""
    _load_foreign(model, hf_state, where, "esm2")


def run_config_file(path: str | Path) -> Path:
    """Where the config.yaml of the run that `path` belongs to lies (it may not exist): `path` is the run
    directory (runs/<name>), its model/ folder or one of its checkpoints (runs/<name>/checkpoints/step_N)."""
    path = Path(path)
    if path.name == "model":
        path = path.parent
    elif path.parent.name == "checkpoints" or (path / "train_state.json").is_file():
        path = path.parent.parent
    return path / "config.yaml"


def _locate(spec: str | Path) -> tuple[Path, ModelConfig | None]:
    """The folder to read (a run directory means its model/), and the run's config for a checkpoint."""
    path = resolve_source(spec)
    if (path / "model" / "config.json").is_file():  # a run directory
        path = path / "model"
    if not (path.name.startswith("step_") and (path / "train_state.json").is_file()):
        return path, None
    run_cfg = run_config_file(path)  # a checkpoint: runs/<name>/checkpoints/step_N
    if not run_cfg.is_file():
        raise ModelLoadError(f"{path}: checkpoint without its run's config.yaml at {run_cfg}")
    try:
        model_dict = yaml.safe_load(run_cfg.read_text())["model"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{run_cfg}: unreadable run config ({str(e).splitlines()[0]})") from None
    return path, model_config_from_dict(model_dict, str(run_cfg))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Return (model in eval mode, ModelConfig) for a run dir, checkpoint, model folder, HF folder or Hub name."""
    from plmrun.model.registry import build_model

    path, cfg = _locate(path)
    if cfg is not None:
        model = build_model(cfg)
        load_checkpoint_weights(path, model)
        return model.to(device).eval(), cfg
    cfg, sd, foreign, where = read_model_folder(path)
    model = build_model(cfg)
    _load_into(model, sd, foreign, where, f"{path / 'config.json'}")
    return model.to(device).eval(), cfg


def load_hf_weights_into(model, path: str | Path) -> None:
    """Copy the weights of a Hugging Face ESM-2 folder (any layout), a plmrun export, saved model or
    checkpoint into `model` (train --init-from-hf), which must have the same architecture and shapes."""
    path, cfg = _locate(path)
    from plmrun.model.esmc import swiglu_width

    checkpoint, foreign = cfg is not None, False
    if not checkpoint:
        cfg, sd, foreign, where = read_model_folder(path)
    if cfg.arch != model.cfg.arch:
        raise ModelLoadError(
            f"{path}: a model.arch={cfg.arch} model, but the training config has "
            f"model.arch={model.cfg.arch}; pick a config of the same architecture"
        )
    shape = lambda c: (c.hidden_size, c.num_layers, swiglu_width(c))
    if foreign and cfg.arch == "esmc" and shape(cfg) != shape(model.cfg):  # ESM C shapes in words, before the first key
        words = lambda c: "width {}, {} layers, MLP width {}".format(*shape(c))
        raise ModelLoadError(
            f"{where}: an ESM C of {words(cfg)}, the training config has {words(model.cfg)}; use "
            "the matching --config (esmc_300m: width 960, 30 layers; esmc_600m: 1152, 36)"
        )
    if checkpoint:
        load_checkpoint_weights(path, model)
    else:
        _load_into(model, sd, foreign, where, "the training config")


def load_esmc_state_dict(model, sd: dict, where: str | Path = "ESM C weights") -> None:
    """Copy an ESM C state dict (the esm package's `ESMC.state_dict()`) into an esmc-preset model."""
    _load_foreign(model, sd, where, "esmc")


def load_checkpoint_weights(path: Path, model) -> None:
    """Model weights of a training checkpoint into a plain model: plmrun.checkpoint's model part, with
    its checks (manifest, then keys and shapes against the DCP metadata, each a one-line error)."""
    from plmrun.checkpoint import load_model_weights

    load_model_weights(path, model)


def load_state_dict_checked(model, sd: dict, where: Path, built_from: str) -> None:
    """Strict load naming the first missing/unexpected key or the first key whose shape differs."""
    if model.cfg.arch == "esm2":  # esm2 folders saved before the block list was named `blocks`
        sd = {("blocks." + k[len("layers.") :] if k.startswith("layers.") else k): v for k, v in sd.items()}
    ours = model.state_dict()
    for key, want in ours.items():
        if key not in sd:
            raise ModelLoadError(
                f"{where}: lacks {key!r}, which the model built from {built_from} has "
                "(different number of layers or architecture switches?)"
            )
        if tuple(sd[key].shape) != tuple(want.shape):
            raise ModelLoadError(
                f"{where}: {key} has shape {tuple(sd[key].shape)}, the model built from "
                f"{built_from} expects {tuple(want.shape)}"
            )
    extra = [k for k in sd if k not in ours]
    if extra:
        raise ModelLoadError(
            f"{where}: {len(extra)} weights the model built from {built_from} does not have, e.g. {extra[0]!r}"
        )
    model.load_state_dict(sd, strict=True)
