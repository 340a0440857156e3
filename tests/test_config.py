import ast
import dataclasses
import re
from pathlib import Path

import pytest

from plmrun import config as C
from plmrun.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = build_config()
    assert cfg.model.arch == "speedrun"
    assert cfg.data.token_budget >= cfg.data.max_length


@pytest.mark.parametrize(
    "value,expected",
    [("false", False), ("False", False), ("0", False), ("no", False), ("true", True), ("1", True), ("yes", True)],
)
def test_bool_overrides_are_parsed_not_truthy(value, expected):
    # the seed's `type=bool` trap: "--unet False" became True
    cfg = build_config(None, [f"--model.unet={value}"])
    assert cfg.model.unet is expected


def test_override_forms_and_types():
    cfg = build_config(
        None,
        [
            "--train.max_steps",
            "12",
            "--optim.betas=[0.9, 0.98]",
            "--train.stop_at_val_loss=2.5",
            "--train.report_at_val_losses=[2.9,2.8]",
            "--model.arch=speedrun",
        ],
    )
    assert cfg.train.max_steps == 12 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.train.stop_at_val_loss == 2.5 and cfg.train.report_at_val_losses == [2.9, 2.8]
    cfg = build_config(None, ["--train.stop_at_val_loss=null"])
    assert cfg.train.stop_at_val_loss is None


def test_explicit_cli_value_equal_to_default_still_wins_over_yaml(tmp_path):
    # the seed could not tell an explicit CLI value equal to the default from "not given"
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  unet: false\n")
    assert build_config(str(f)).model.unet is False
    assert build_config(str(f), ["--model.unet=true"]).model.unet is True


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--model.hidden=3"], "unknown key model.hidden"),
        (["--modle.unet=true"], "unknown section"),
        (["--model.unet=maybe"], "expected true or false"),
        (["--train.max_steps=ten"], "expected an integer"),
        (["--model.arch=gpt"], "is not one of"),
        (["--model.hidden_size=100", "--model.num_heads=3"], "divisible"),
        (["--data.token_budget=100"], "token_budget"),
        (["--masking.mask_rate=1.5"], "mask_rate"),
        (["--model.arch=esm2"], "speedrun option"),
        (["--masking.objective=mlm_to_diffusion"], "ramp_steps"),
        (["--optim.warmup=500", "--train.max_steps=100"], "exceed train.max_steps"),
        (["train.max_steps=3"], "unrecognised argument"),
        (["--train.max_steps"], "missing value"),
        (
            ["--train.global_batch_tokens=3000"],
            "train.global_batch_tokens (3000) must be a multiple of data.token_budget (2048)",
        ),
        (
            ["--train.global_batch_tokens=4096", "--train.grad_accum=2"],
            "train.global_batch_tokens (4096) derives grad_accum from the world size; "
            "leave train.grad_accum at 1 (got 2)",
        ),
        (["--train.max_time=-5"], "train.max_time must be >= 0 seconds (0 = no limit), got -5.0"),
        (["--train.max_time=1h"], "train.max_time: expected a number"),
        (["--optim.lr=nan"], "--optim.lr: optim.lr: expected a finite number, got 'nan'"),
        (["--train.max_time=.inf"], "--train.max_time: train.max_time: expected a finite number, got inf"),
        (["--logging.push_to_hub=model"], "logging.push_to_hub must be a Hub repo id like user/name, got 'model'"),
        (["--train.dense_eval_every=80"], "train.dense_eval_every (80) needs train.eval_every > it (now 80)"),
        (
            ["--train.dense_eval_every=10", "--train.eval_every=0"],
            "train.dense_eval_every (10) needs train.eval_every > it",
        ),
        (["--train.dense_eval_every=-1"], "train.dense_eval_every must be >= 0"),
        (["--train.dense_eval_margin=0"], "train.dense_eval_margin must be > 0"),
    ],
)
def test_bad_values_give_one_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(None, overrides)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  hidden_size: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(str(f))
    f.write_text("model:\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key model.colour"):
        build_config(str(f))
    with pytest.raises(ConfigError, match="no such config file"):
        build_config(str(tmp_path / "missing.yaml"))


def test_yaml_base_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  max_steps: 7\n  seed: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  seed: 5\n")
    cfg = build_config(str(tmp_path / "b.yaml"))
    assert (cfg.train.max_steps, cfg.train.seed) == (7, 5)


def test_every_shipped_config_validates():
    names = C.list_shipped_configs()
    assert "debug" in names and "esm2_8m" in names
    for name in names:
        build_config(name)


def test_docs_option_table_matches_dataclasses():
    doc = (ROOT / "docs" / "reference" / "config.md").read_text()
    assert C.options_markdown() in doc, (
        "docs/reference/config.md option table drifted: regenerate with `plmrun config --markdown`"
    )


def _section_reads(tree, sections) -> set:
    """(section, key) pairs read in `tree`: `<x>.SECTION.key`, or `v.key` where v is bound to `<x>.SECTION`
    (`t = cfg.train`, `self.t = cfg.train`), annotated with the section's class (`cfg: EvalConfig`), or
    `self` of a class that copies the section field by field (`fields(MaskingConfig)`)."""
    by_class = {cls.__name__: s for s, cls in sections.items()}
    class_re = re.compile(r"\b(" + "|".join(map(re.escape, by_class)) + r")\b")
    alias: dict = {}

    def bind(target, section):
        name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", target)
        alias.setdefault(name, set()).add(section)

    def annotated(annotation):
        m = class_re.search(ast.unparse(annotation)) if annotation is not None else None
        return by_class[m.group(1)] if m else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and node.value.attr in sections:
            for t in node.targets:
                bind(t, node.value.attr)
        elif isinstance(node, ast.arg) and annotated(node.annotation):
            bind(node.arg, annotated(node.annotation))
        elif isinstance(node, ast.AnnAssign) and annotated(node.annotation):
            bind(node.target, annotated(node.annotation))
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("fields")
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in by_class
        ):
            bind("self", by_class[node.args[0].id])
    reads = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            v = node.value
            if isinstance(v, ast.Attribute) and v.attr in sections:
                reads.add((v.attr, node.attr))
            name = v.id if isinstance(v, ast.Name) else getattr(v, "attr", None)
            reads |= {(s, node.attr) for s in alias.get(name, ())}
    return reads


def _dead_keys(sections) -> list:
    """Config keys that no module outside config.py reads from their own section."""
    reads = set()
    for p in (ROOT / "plmrun").rglob("*.py"):
        if p.name != "config.py":
            reads |= _section_reads(ast.parse(p.read_text()), sections)
    return [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls) if (s, f.name) not in reads]


def test_every_config_key_is_read_somewhere():
    """No dead options: each key is read from its own section outside config.py."""
    assert _dead_keys(C._section_classes()) == [], "config keys never read"


def test_dead_key_check_catches_keys_with_common_names():
    """A dead key named like attributes read everywhere (`.seed`, `.name` of other sections and of
    paths) is still caught: only a read from its own section counts."""
    sections = dict(C._section_classes())
    for section, key in (("dist", "seed"), ("eval", "name")):
        sections[section] = dataclasses.make_dataclass(
            sections[section].__name__, [(key, int, 0)], bases=(sections[section],)
        )
    sources = "\n".join(p.read_text() for p in (ROOT / "plmrun").rglob("*.py") if p.name != "config.py")
    assert re.search(r"\.seed\b", sources) and re.search(r"\.name\b", sources)  # a name-only search passes them
    assert _dead_keys(sections) == ["eval.name", "dist.seed"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.max_length_schedule=[[1, 512]]"], "data.max_length_schedule: the first entry must start at step 0"),
        (["--data.max_length_schedule=[[0, 512], [0, 1024]]"], "data.max_length_schedule: steps must increase"),
        (["--data.max_length_schedule=[[0, 2]]"], "max_length 2 at step 0 must be >= 3"),
        (
            ["--data.max_length_schedule=[[0, 512], [100, 4096]]"],
            "data.token_budget (2048) must be >= data.max_length_schedule length 4096 (step 100)",
        ),
        (["--data.max_length_schedule=[[0, 512, 3]]"], "each entry must be [step, max_length]"),
        (
            ["--config=esm2", "--data.max_length_schedule=[[0, 512], [100, 2048]]"],
            "data.max_length_schedule: 2048 tokens exceed the model.arch=esm2 position limit of 1026",
        ),
        (
            ["--config=esm2", "--data.max_length=2048"],
            "data.max_length: 2048 tokens exceed the model.arch=esm2 position limit",
        ),
        (
            ["--config=esm2", "--eval.max_length=2048", "--eval.token_budget=4096"],
            "eval.max_length: 2048 tokens exceed",
        ),
    ],
)
def test_crop_schedule_and_position_limits_are_checked(overrides, message):
    config = None
    if overrides[0].startswith("--config="):
        config, overrides = "esm2_8m", overrides[1:]
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(config, overrides)


def test_rotary_presets_take_a_long_crop_schedule():
    for config in (None, "esmc_cpu"):
        cfg = build_config(config, ["--data.max_length_schedule=[[0, 512], [100, 4096]]", "--data.token_budget=8192"])
        assert cfg.data.max_length_schedule == [[0, 512], [100, 4096]]


# ------------------------------------------------------------------ one flag grammar and one set of value rules
def test_a_flag_followed_by_a_flag_is_missing_its_value():
    """`--train.compile --train.max_steps=3` used to read '--train.max_steps=3' as the compile value."""
    with pytest.raises(ConfigError, match=re.escape("--train.compile: missing value (write --train.compile=VALUE")):
        build_config(None, ["--train.compile", "--train.max_steps=3"])
    assert build_config(None, ["--optim.weight_decay", "-0.0"]).optim.weight_decay == 0.0  # a negative is a value


@pytest.mark.parametrize(
    "key,value,need",
    [
        ("mask_rate", 1.5, " 1.5: must be in (0, 1), e.g. 0.15 (the ESM-2 protocol)"),
        ("max_length", 2, " 2: must be >= 3 (<cls>, a residue, <eos>)"),
        (
            "token_budget",
            1000,
            " 1000 is below the eval window of 1024 tokens ({max_length}): use {token_budget} >= 1024",
        ),
    ],
)
def test_eval_section_and_eval_flags_share_one_rule(key, value, need):
    """The eval section's ranges and `plmrun eval`'s flags are one rule (config.validate_eval); only the
    names differ: keys in a config, flags on the eval command line (tests/test_eval.py)."""
    keys = {k: f"eval.{k}" for k in C.EVAL_FLAGS}
    with pytest.raises(ConfigError, match=re.escape(keys[key] + need.format(**keys))):
        build_config(None, [f"--eval.{key}={value}"])
    with pytest.raises(ConfigError, match=re.escape(C.EVAL_FLAGS[key] + need.format(**C.EVAL_FLAGS))):
        C.validate_eval(dataclasses.replace(C.EvalConfig(), **{key: value}), C.EVAL_FLAGS)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--eval.subset=-1", "eval.subset -1: must be >= 0 (0 = all)"),
        ("--data.max_length=2", "data.max_length 2: must be >= 3 (<cls>, a residue, <eos>)"),
    ],
)
def test_window_and_count_rules_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(None, [override])


def _parsers():
    """Every argparse parser of the CLI (the top level and each command and sub-command)."""
    import argparse

    from plmrun.cli import build_parser

    todo, seen = [build_parser()], []
    while todo:
        p = todo.pop()
        seen.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += list(a.choices.values())
    return seen


def test_no_command_flag_is_a_type_bool_trap():
    """`type=bool` reads "False" as True; switches are store_true, settings go through config's bool coercion."""
    actions = [(p.prog, a.option_strings) for p in _parsers() for a in p._actions if a.type is bool]
    assert actions == []
    assert len(_parsers()) > 15  # the walk reaches the commands


@pytest.mark.parametrize(
    "argv,want",
    [
        (["eval", "m", "--max-length", "ten"], "error: plmrun eval: argument --max-length: invalid int value: 'ten'"),
        (["probe", "m", "--head", "svm"], "error: plmrun probe: argument --head: invalid choice: 'svm'"),
        (["zeroshot", "m", "--wildtype", "MKT"], "error: plmrun zeroshot: the following arguments are required: --dms"),
        (["eval", "m", "--frobnicate"], "error: plmrun: unrecognised arguments: --frobnicate"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, want):
    from plmrun.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(want) and err.count("\n") == 1 and "usage:" not in err


@pytest.mark.parametrize(
    "argv,want",
    [
        (
            ["embed", "m", "x.fa", "--out", "e.safetensors", "--chunk-size", "0"],
            "error: --chunk-size 0: must be >= 1 (records per resumable chunk)",
        ),
        (
            ["embed", "m", "x.fa", "--out", "e.safetensors", "--max-length", "2"],
            "error: --max-length 2: must be >= 3 (<cls>, a residue, <eos>)",
        ),
        (
            ["embed", "m", "x.fa", "--out", "e.safetensors", "--token-budget", "0"],
            "error: --token-budget 0: must be >= 1 (batches grow to hold one window)",
        ),
        (["probe", "m", "--max-length", "2"], "error: --max-length 2: must be >= 3 (<cls>, a residue, <eos>)"),
        (["eval", "m", "--device", "gpu"], "error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
        (["probe", "m", "--seeds", "0"], "error: --seeds 0: must be >= 1"),
        (["probe", "m", "--max-train", "1"], "error: --max-train 1: must be >= 2"),
        (
            ["zeroshot", "m", "--dms", "d.csv", "--wildtype", "MKT", "--max-length", "1"],
            "error: zeroshot: --max-length 1: must be >= 3 (<cls>, a residue, <eos>)",
        ),
        (
            ["zeroshot", "m", "--dms", "d.csv", "--wildtype", "MKT", "--token-budget", "0"],
            "error: zeroshot: --token-budget 0: must be >= 1",
        ),
    ],
)
def test_inference_flags_checked_by_the_same_rules_before_loading(capsys, argv, want):
    """embed, probe and zeroshot declare and check their shared flags once (plmrun.eval.flags) and word a
    range like eval and the config do, before any file is read."""
    from plmrun.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(want) and err.count("\n") == 1
