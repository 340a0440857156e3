"""The shared pieces every command leans on: the typed-error root, the one device resolver, folder
manifests, and the one meaning of a dataset argument."""
import json

import pytest
import torch

from plmrun.cli import main
from plmrun.device import DeviceError, resolve_device
from plmrun.errors import PlmrunError
from plmrun.manifest import MANIFEST, ManifestError, read_manifest, verify_manifest, write_manifest


def test_every_typed_error_is_a_plmrun_error():
    from plmrun.config import ConfigError
    from plmrun.data.errors import DataError
    from plmrun.eval.errors import EvalError
    from plmrun.eval.export import ExportError
    from plmrun.model.loading import ModelLoadError
    from plmrun.tokenizer import InvalidSequenceError
    from plmrun.experiments.record import RecordError
    from plmrun.train.rundir import RunDirError
    from plmrun.train.trainer import TrainingError
    from plmrun.finetune.run import FinetuneError
    for cls in (ConfigError, DataError, EvalError, ExportError, ModelLoadError, InvalidSequenceError, RecordError,
                RunDirError, TrainingError, DeviceError, ManifestError, FinetuneError):
        assert issubclass(cls, PlmrunError), cls


def test_cli_turns_an_os_error_into_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["data", "cat", "bundled", "--split", "valid", "--limit", "1", "--out", str(blocker / "out.fa")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(blocker / "out.fa") in err


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(DeviceError, match="no CUDA device is visible"):
                resolve_device(name)


def test_cli_device_error_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["eval", "bundled", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "error: device 'cuda' requested but no CUDA device is visible; use --device cpu (or auto)\n"


def _folder(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "x.bin").write_bytes(b"abc")
    (d / "left.tmp").write_text("a temp file is never listed")
    write_manifest(d)
    return d


def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = _folder(tmp_path)
    assert sorted(read_manifest(d)) == ["config.json", "model.safetensors", "sub/x.bin"]
    assert verify_manifest(d) is True
    assert not (d / (MANIFEST + ".tmp")).exists()
    assert verify_manifest(tmp_path) is False  # no manifest: nothing to check (older or foreign folders)
    with pytest.raises(ManifestError, match="no MANIFEST.json"):
        verify_manifest(tmp_path, required=True)


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"model.safetensors: 5000 bytes, the manifest says 10240 \(truncated"),
    ("flip", r"model.safetensors: contents do not match the checksum"),
    ("delete", r"sub/x.bin: listed in MANIFEST.json but missing"),
    ("edit_manifest", r"MANIFEST.json: the manifest was edited after it was written"),
    ("truncate_manifest", r"MANIFEST.json: unreadable manifest"),
])
def test_manifest_detects_damage(tmp_path, damage, message):
    d = _folder(tmp_path)
    weights = d / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[777] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "delete":
        (d / "sub" / "x.bin").unlink()
    elif damage == "edit_manifest":  # a hand-edited fingerprint, matching the edited file
        (d / "config.json").write_text('{"a": 2}')
        m = json.loads((d / MANIFEST).read_text())
        from plmrun.manifest import file_sha256
        m["files"]["config.json"]["sha256"] = file_sha256(d / "config.json")
        (d / MANIFEST).write_text(json.dumps(m))
    else:
        text = (d / MANIFEST).read_text()
        (d / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match=message) as e:
        verify_manifest(d)
    assert "\n" not in str(e.value)


def test_resolve_dataset_is_the_bundled_corpus_or_the_given_directory(tmp_path):
    from plmrun.data.corpus import bundled_dataset_dir, resolve_dataset
    assert resolve_dataset("bundled") == bundled_dataset_dir()
    assert resolve_dataset(str(tmp_path)) == tmp_path
    assert resolve_dataset(tmp_path) == tmp_path


def _plmrun_modules():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "plmrun"
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(root.parent).with_suffix("").as_posix().replace("/", "."), ast.parse(path.read_text())


def test_one_cli_entry_library_code_raises_typed_errors_only():
    """No `SystemExit` and no `main()` outside plmrun/cli.py: the one entry turns typed errors into lines."""
    import ast
    found = []
    for module, tree in _plmrun_modules():
        if module == "plmrun.cli":
            continue
        found += [f"{module}: def main" for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        found += [f"{module}:{n.lineno}: SystemExit" for n in ast.walk(tree)
                  if isinstance(n, ast.Name) and n.id == "SystemExit"]
    assert found == []


def test_imports_never_run_upward():
    """data/ and model/ below train/ and eval/; eval/ never imports train/; nothing imports experiments/
    but the CLI (experiment tooling sits on top of training)."""
    import ast
    below = {"plmrun.data": ("plmrun.train", "plmrun.eval", "plmrun.experiments"),
             "plmrun.model": ("plmrun.train", "plmrun.eval", "plmrun.experiments"),
             "plmrun.eval": ("plmrun.train", "plmrun.experiments"),
             "plmrun.train": ("plmrun.experiments",)}
    upward = []
    for module, tree in _plmrun_modules():
        banned = next((b for pkg, b in below.items() if module.startswith(pkg + ".")), ())
        for n in ast.walk(tree):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) and n.level == 0 else []
            upward += [f"{module}:{n.lineno} imports {x}" for x in names if banned and x.startswith(banned)]
    assert upward == []
