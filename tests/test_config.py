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


@pytest.mark.parametrize("value,expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                            ("true", True), ("1", True), ("yes", True)])
def test_bool_overrides_are_parsed_not_truthy(value, expected):
    # the seed's `type=bool` trap: "--unet False" became True
    cfg = build_config(None, [f"--model.unet={value}"])
    assert cfg.model.unet is expected


def test_override_forms_and_types():
    cfg = build_config(None, ["--train.max_steps", "12", "--optim.betas=[0.9, 0.98]", "--train.stop_at_val_loss=2.5",
                              "--train.report_at_val_losses=[2.9,2.8]", "--model.arch=speedrun"])
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


@pytest.mark.parametrize("overrides,message", [
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
    (["--train.global_batch_tokens=3000"], "train.global_batch_tokens (3000) must be a multiple of data.token_budget (2048)"),
    (["--train.global_batch_tokens=4096", "--train.grad_accum=2"],
     "train.global_batch_tokens (4096) derives grad_accum from the world size; leave train.grad_accum at 1 (got 2)"),
    (["--train.max_time=-5"], "train.max_time must be >= 0 seconds (0 = no limit), got -5.0"),
    (["--train.max_time=1h"], "train.max_time: expected a number"),
    (["--logging.push_to_hub=model"], "logging.push_to_hub must be a Hub repo id like user/name, got 'model'"),
    (["--train.dense_eval_every=80"], "train.dense_eval_every (80) needs train.eval_every > it (now 80)"),
    (["--train.dense_eval_every=10", "--train.eval_every=0"], "train.dense_eval_every (10) needs train.eval_every > it"),
    (["--train.dense_eval_every=-1"], "train.dense_eval_every must be >= 0"),
    (["--train.dense_eval_margin=0"], "train.dense_eval_margin must be > 0"),
])
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
    assert C.options_markdown() in doc, \
        "docs/reference/config.md option table drifted: regenerate with `plmrun config --markdown`"


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
        elif (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("fields") and node.args
              and isinstance(node.args[0], ast.Name) and node.args[0].id in by_class):
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
        sections[section] = dataclasses.make_dataclass(sections[section].__name__, [(key, int, 0)],
                                                       bases=(sections[section],))
    sources = "\n".join(p.read_text() for p in (ROOT / "plmrun").rglob("*.py") if p.name != "config.py")
    assert re.search(r"\.seed\b", sources) and re.search(r"\.name\b", sources)   # a name-only search passes them
    assert _dead_keys(sections) == ["eval.name", "dist.seed"]


@pytest.mark.parametrize("overrides,message", [
    (["--data.max_length_schedule=[[1, 512]]"], "data.max_length_schedule: the first entry must start at step 0"),
    (["--data.max_length_schedule=[[0, 512], [0, 1024]]"], "data.max_length_schedule: steps must increase"),
    (["--data.max_length_schedule=[[0, 2]]"], "max_length 2 at step 0 must be >= 3"),
    (["--data.max_length_schedule=[[0, 512], [100, 4096]]"], "data.token_budget (2048) must be >= data.max_length_schedule length 4096 (step 100)"),
    (["--data.max_length_schedule=[[0, 512, 3]]"], "each entry must be [step, max_length]"),
    (["--config=esm2", "--data.max_length_schedule=[[0, 512], [100, 2048]]"],
     "data.max_length_schedule: 2048 tokens exceed the model.arch=esm2 position limit of 1026"),
    (["--config=esm2", "--data.max_length=2048"], "data.max_length: 2048 tokens exceed the model.arch=esm2 position limit"),
    (["--config=esm2", "--eval.max_length=2048", "--eval.token_budget=4096"], "eval.max_length: 2048 tokens exceed"),
])
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
