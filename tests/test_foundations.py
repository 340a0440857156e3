"""The shared pieces every command leans on: the typed-error root, the one device resolver, folder
manifests, and the one meaning of a dataset argument."""

import json

import pytest
import torch

from plmrun.cli import main
from plmrun.device import DeviceError, resolve_device
from plmrun.errors import PlmrunError
from plmrun.manifest import MANIFEST, ManifestError, read_manifest, verify_manifest, write_manifest


def _exception_classes() -> set:
    """Every exception class a plmrun module defines, found by importing every module of the package."""
    import importlib
    import inspect
    import pkgutil

    import plmrun

    found = set()
    for info in pkgutil.walk_packages(plmrun.__path__, "plmrun."):
        module = importlib.import_module(info.name)
        found |= {
            c
            for c in vars(module).values()
            if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == module.__name__
        }
    return found


# Exceptions that never reach a user: raised and handled inside plmrun.
INTERNAL_EXCEPTIONS = {
    # parse_mutant's "this row is no substitution": read_dms counts such rows, or (--strict) raises an error
    # naming the file and line
    "plmrun.eval.zeroshot.NotSubstitution",
}


def test_every_typed_error_is_a_plmrun_error():
    """Every exception class plmrun defines derives from PlmrunError (the CLI prints those as one line), found
    automatically: a new error class cannot be forgotten here."""
    named = {f"{c.__module__}.{c.__qualname__}": c for c in _exception_classes()}
    # the search is real: it finds the 12 classes this test once listed by hand and the 2 that list missed
    assert {c.__name__ for c in named.values()} >= {
        "ConfigError",
        "DataError",
        "EvalError",
        "ExportError",
        "ModelLoadError",
        "InvalidSequenceError",
        "RecordError",
        "RunDirError",
        "TrainingError",
        "DeviceError",
        "ManifestError",
        "FinetuneError",
        "CheckpointError",
        "OptimizerStateError",
    }
    assert INTERNAL_EXCEPTIONS <= set(named), "an internal exception was renamed or removed: update the list"
    untyped = [
        name for name, c in sorted(named.items()) if not issubclass(c, PlmrunError) and name not in INTERNAL_EXCEPTIONS
    ]
    assert untyped == []


def test_cli_turns_an_os_error_into_one_line(tmp_path, capsys, bundled_corpus):
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


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", r"model.safetensors: 5000 bytes, the manifest says 10240 \(truncated"),
        ("flip", r"model.safetensors: contents do not match the checksum"),
        ("delete", r"sub/x.bin: listed in MANIFEST.json but missing"),
        ("edit_manifest", r"MANIFEST.json: the manifest was edited after it was written"),
        ("truncate_manifest", r"MANIFEST.json: unreadable manifest"),
    ],
)
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
    """(module name, syntax tree) of every .py file under plmrun/."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "plmrun"
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(root.parent).with_suffix("").as_posix().replace("/", "."), ast.parse(path.read_text())


def _imports(module: str, tree) -> list:
    """(line, imported module, names) for every import in `tree`, relative ones resolved against `module`
    (`from .layers import X` in plmrun.model.esm2 is plmrun.model.layers). Names is () for `import a.b`."""
    import ast

    package = module[: -len(".__init__")] if module.endswith(".__init__") else module.rsplit(".", 1)[0]
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [(n.lineno, a.name, ()) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (n.level - 1)] + ([n.module] if n.module else []))
            if n.module is None:  # `from . import x`: x is a module of the package (or a name in its __init__)
                found += [(n.lineno, f"{base}.{a.name}", ()) for a in n.names]
            else:
                found.append((n.lineno, base, tuple(a.name for a in n.names)))
    return found


def test_imports_resolve_relative_ones():
    """The resolver the import tests use: a relative import counts as the absolute module it names."""
    import ast

    tree = ast.parse("from .layers import PLM\nfrom ..config import ModelConfig\nfrom . import esm2\nimport torch\n")
    assert _imports("plmrun.model.esmc", tree) == [
        (1, "plmrun.model.layers", ("PLM",)),
        (2, "plmrun.config", ("ModelConfig",)),
        (3, "plmrun.model.esm2", ()),
        (4, "torch", ()),
    ]
    assert _imports("plmrun.model.__init__", ast.parse("from .layers import PLM\n"))[0][1] == "plmrun.model.layers"


def test_one_cli_entry_library_code_raises_typed_errors_only():
    """No `SystemExit` and no `main()` outside plmrun/cli.py: the one entry turns typed errors into lines."""
    import ast

    found = []
    for module, tree in _plmrun_modules():
        if module == "plmrun.cli":
            continue
        found += [f"{module}: def main" for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        found += [
            f"{module}:{n.lineno}: SystemExit"
            for n in ast.walk(tree)
            if isinstance(n, ast.Name) and n.id == "SystemExit"
        ]
    assert found == []


# The layers, bottom to top: a module imports only modules of its own layer or below. The CLI on top;
# experiment tooling on training; fine-tuning on the trainer; training on evaluation; data, models,
# optimizers, their checkpoints, the tokenizer (over model/'s vocabulary) and the run config that gathers their
# sections below; errors, device, manifest and any other small top-level module at the bottom (layer 0).
LAYERS = {
    "plmrun.cli": 6,
    "plmrun.experiments": 5,
    "plmrun.finetune": 4,
    "plmrun.train": 3,
    "plmrun.eval": 2,
    "plmrun.data": 1,
    "plmrun.model": 1,
    "plmrun.optim": 1,
    "plmrun.checkpoint": 1,
    "plmrun.config": 1,
    "plmrun.tokenizer": 1,
}


def _layer(module: str) -> int:
    return next((n for pkg, n in LAYERS.items() if module == pkg or module.startswith(pkg + ".")), 0)


def test_imports_never_run_upward():
    """data/, model/, optim/, checkpoint and config below eval/; eval/ never imports train/; train/ never imports
    finetune/; nothing imports experiments/ but the CLI (experiment tooling sits on top of training). Relative
    imports count too (model/ uses them throughout)."""
    assert (
        _layer("plmrun.model.esm2") == 1
        and _layer("plmrun.tokenizer") == 1
        and _layer("plmrun.device") == 0
        and _layer("plmrun.cli") == 6
    )
    upward, inside_model = [], 0
    for module, tree in _plmrun_modules():
        for line, target, _ in _imports(module, tree):
            inside_model += target.startswith("plmrun.model.") and module.startswith("plmrun.model.")
            if target.startswith("plmrun") and _layer(target) > _layer(module):
                upward.append(f"{module}:{line} imports {target}")
    assert inside_model > 0  # model/ imports itself only relatively (`from .layers import`): those were seen
    assert upward == []


def _dotted(node) -> str:
    """`a.b.c` for a chain of names, "" for anything else (a call, a subscript, ...)."""
    import ast

    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def test_no_module_imports_a_private_name_of_another():
    """`from plmrun.x import _helper`, or `x._helper` on an imported plmrun module, outside plmrun/x.py: a
    private name is free to change inside its module, so whoever else needs it needs a public name. Checked
    in plmrun/, benchmarks/ and scripts/ (tests may test private helpers directly)."""
    import ast
    from pathlib import Path

    def private(name):
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted(p for d in ("plmrun", "benchmarks", "scripts") for p in (root / d).rglob("*.py")):
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        tree = ast.parse(path.read_text())
        bound = {}  # local name -> the dotted plmrun name it stands for (`ckpt` -> plmrun.checkpoint)
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                bound.update(
                    {a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in n.names}
                )
            elif isinstance(n, ast.ImportFrom):
                resolved = [target for _, target, _ in _imports(module, ast.Module([n], []))]
                targets = resolved if n.module is None else [f"{resolved[0]}.{a.name}" for a in n.names]
                bound.update({a.asname or a.name: target for a, target in zip(n.names, targets)})
        for line, target, names in _imports(module, tree):
            if target.startswith("plmrun.") and target != module:
                found += [f"{module}:{line} imports {target}.{x}" for x in names if private(x)]
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and private(n.attr):
                head, _, rest = _dotted(n.value).partition(".")
                owner = ".".join(filter(None, [bound.get(head), rest]))
                if head in bound and owner.startswith("plmrun") and owner != module:
                    found.append(f"{module}:{n.lineno} uses {owner}.{n.attr}")
    assert found == [], "\n".join(found)
