"""`plmrun export`: a run, checkpoint or model folder -> a Hugging Face model folder (+ optional Hub upload).

- esm2 preset -> a native `EsmForMaskedLM` folder (config.json, model.safetensors): loads with plain
  `transformers`, no remote code.
- speedrun architecture -> `AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)`: the
  folder gets plmrun's own model modules, copied as they are (`plmrun.model` imports nothing else from
  plmrun, and only its own modules relatively, which is what remote code can load), and the small
  wrapper from `hf_remote/`.
Both get the ESM tokenizer files, a model card with the training summary and a MANIFEST.json
(checksums of every file but the card, written last) that `load_model` verifies.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from plmrun import tokenizer as tok
from plmrun.atomic import atomic_dir
from plmrun.errors import PlmrunError
from plmrun.manifest import follow_umask, write_manifest
from plmrun.model.config import ESM2_POSITION_LIMIT, POSITION_LIMIT, ModelConfig
from plmrun.model.loading import load_model
from plmrun.outputs import check_output_dir, mark_output, model_inputs

MODEL_PACKAGE = Path(__file__).resolve().parents[1] / "model"
HF_REMOTE = Path(__file__).parent / "hf_remote"


class ExportError(PlmrunError, RuntimeError):
    """Export cannot proceed (the message says why)."""


ROTARY_MAX_LENGTH = 1_000_000_000
"Tokenizer limit for rotary-only models: no position table, so no length warning on long proteins."


def write_tokenizer_files(out: Path, model_max_length: int = ESM2_POSITION_LIMIT) -> None:
    (out / "vocab.txt").write_text("\n".join(tok.VOCAB) + "\n")
    special = {
        "cls_token": "<cls>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }
    tokenizer_config = {"tokenizer_class": "EsmTokenizer", "model_max_length": model_max_length, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def esm_hf_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": tok.VOCAB_SIZE,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": round(cfg.hidden_size * cfg.expansion_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": ESM2_POSITION_LIMIT,
        "position_embedding_type": "rotary",
        "layer_norm_eps": cfg.layer_norm_eps,
        "emb_layer_norm_before": False,
        "token_dropout": cfg.token_dropout,
        "mask_token_id": tok.MASK,
        "pad_token_id": tok.PAD,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "is_folding_model": False,
        "use_cache": False,
        "torch_dtype": "float32",
    }


def shipped_model_modules() -> list[str]:
    """The model package's modules an export carries: those the `hf_remote/` wrapper imports, and theirs.

    Remote code loads only modules that sit beside it and are imported relatively (`from .layers import`),
    so each must import nothing from plmrun outside the model package; an ExportError names one that does.
    """
    todo = [f for f in HF_REMOTE.glob("*.py")]
    shipped: set[str] = set()
    while todo:
        path = todo.pop()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                name = node.module + ".py"
                if name not in shipped and (MODEL_PACKAGE / name).is_file():
                    shipped.add(name)
                    todo.append(MODEL_PACKAGE / name)
            elif isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("plmrun")):
                raise ExportError(
                    f"{path.name} imports {'.' * node.level}{node.module or ''} from outside the model "
                    "package; exported models carry only plmrun/model/"
                )
    return sorted(shipped)


def _copy_model_code(out: Path) -> None:
    """Copy the remote-code wrapper and the model modules it needs, each file as it is."""
    for path in HF_REMOTE.glob("*.py"):
        shutil.copyfile(path, out / path.name)
    for name in shipped_model_modules():
        shutil.copyfile(MODEL_PACKAGE / name, out / name)


def dataset_name(dataset) -> str:
    """A dataset's name for a model card: the folder's last part, less plmrun's cache suffix (-16 hex),
    so the card never shows a local path like /root/.cache/plmrun/swissprot2014_small-191be9c581187484."""
    name = Path(str(dataset or "unknown")).name
    return re.sub(r"-[0-9a-f]{16}$", "", name) or "unknown"


CARD_PATH_LINE = 'PATH = "path/to/this/folder"  # or the Hub repo id'
"The model card snippet's one placeholder line."


def _model_card(cfg: ModelConfig, n_params: int, summary: dict | None, source: Path) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "tags: [protein-language-model, plmrun, masked-lm]",
        "---",
        "",
        f"# {source.name} (plmrun {cfg.arch})",
        "",
        f"A protein masked language model trained with plmrun: {n_params / 1e6:.2f}M parameters, "
        f"{cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads} heads, ESM-2 33-token vocabulary.",
        "",
    ]
    if cfg.arch == "esm2":
        lines += [
            "Loads as a native `EsmForMaskedLM`:",
            "",
            "```python",
            "from transformers import EsmForMaskedLM, AutoTokenizer",
            CARD_PATH_LINE,
            "model = EsmForMaskedLM.from_pretrained(PATH)",
            "tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "```",
        ]
    else:
        lines += [
            "Loads with remote code (the architecture files are in this folder):",
            "",
            "```python",
            "from transformers import AutoModelForMaskedLM, AutoTokenizer",
            CARD_PATH_LINE,
            "model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)",
            # the folder's config needs remote code, which AutoTokenizer would otherwise ask about
            "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
            "```",
        ]
    if summary:
        lines += ["", "## Training summary", "", "| | |", "|---|---|"]
        for key in (
            "steps",
            "tokens",
            "train_time_s",
            "tok_per_s",
            "mfu",
            "device",
            "world_size",
            "precision",
            "best_val_loss",
        ):
            if summary.get(key) is not None:
                v = summary[key]
                lines.append(f"| {key} | {v:.4g} |" if isinstance(v, float) else f"| {key} | {v} |")
        full = summary.get("final_full_val")
        if full:
            lines.append(f"| full valid split loss / accuracy | {full['loss']:.4f} / {full['accuracy']:.4f} |")
        for thr, r in (summary.get("time_to_target") or {}).items():
            lines.append(f"| time to val loss {thr} | {r['train_time_s']:.1f} s, {r['tokens']:,} tokens |")
        data = summary.get("data") or {}
        if data:
            lines.append(
                f"| training data | {dataset_name(data.get('dataset'))} "
                f"(train fingerprint `{data.get('train_fingerprint')}`) |"
            )
    lines += [
        "",
        "Evaluation protocol and metrics: see the plmrun README (15% of residues masked, all `<mask>`, "
        "fixed masks; token-weighted loss).",
    ]
    return "\n".join(lines) + "\n"


def export(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder for `source`; returns it. Files are written to a temp folder, then renamed."""
    source, out = Path(source), Path(out)
    check_output_dir(out, model_inputs(source), overwrite=overwrite, error=ExportError)
    model, cfg = load_model(source)
    summary = None
    for cand in (source / "summary.json", source.parent / "summary.json", source.parent.parent / "summary.json"):
        if cand.is_file():
            summary = json.loads(cand.read_text())
            break
    with atomic_dir(out) as tmp:
        _write_export(tmp, model, cfg, summary, source)
        mark_output(tmp, "export")  # what --overwrite may replace later
    return out


def _write_export(tmp: Path, model, cfg: ModelConfig, summary, source: Path) -> None:
    """The export folder's files, written into the temporary folder `tmp`."""
    from safetensors.torch import save_file

    if cfg.arch == "esm2":
        hf_cfg = esm_hf_config(cfg)
        hf_cfg["plmrun_model"] = asdict(cfg)
        sd = model.adapter.export(model)
    else:
        hf_cfg = {
            "architectures": ["PlmrunForMaskedLM"],
            "model_type": "plmrun",
            "plmrun_model": asdict(cfg),
            "vocab_size": tok.VOCAB_SIZE,
            "pad_token_id": tok.PAD,
            "mask_token_id": tok.MASK,
            "auto_map": {
                "AutoConfig": "configuration_plmrun.PlmrunConfig",
                "AutoModelForMaskedLM": "modeling_plmrun.PlmrunForMaskedLM",
                "AutoModel": "modeling_plmrun.PlmrunForMaskedLM",
            },
        }
        sd = {f"plm.{k}": v for k, v in model.state_dict().items()}
        _copy_model_code(tmp)
    # safetensors refuses shared storage (tied embeddings): store independent copies
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    follow_umask(tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    write_tokenizer_files(tmp, POSITION_LIMIT.get(cfg.arch, ROTARY_MAX_LENGTH))
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / "README.md").write_text(_model_card(cfg, n_params, summary, source))
    # checksums last, of everything but the model card (made to be edited before a Hub upload)
    write_manifest(tmp, sorted(f.name for f in tmp.iterdir() if f.is_file() and f.name != "README.md"))


def hub_token() -> str:
    """The Hub token from HF_TOKEN (never from files or flags), or a one-line ExportError."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ExportError("set HF_TOKEN in the environment to push to the Hub (it is never read from files or flags)")
    return token


def push_to_hub(folder: Path, repo: str, *, private: bool = False) -> str:
    """Upload `folder` to the Hub repo; the token comes from HF_TOKEN (never printed or logged)."""
    from huggingface_hub import HfApi

    token = hub_token()
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="plmrun export")
    except Exception as e:  # network, auth, offline mode: one line, token scrubbed
        msg = str(e).replace(token, "***").splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"upload to {repo} failed: {msg}") from None
    return f"https://huggingface.co/{repo}"


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a Hugging Face model folder (and optionally upload it)")
    p.add_argument("model", help="run directory, checkpoint or model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload to this Hub repo (token from HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    out = export(args.model, args.out, overwrite=args.overwrite)
    print(f"exported {args.model} -> {out}")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0
