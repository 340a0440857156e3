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


def test_readme_option_table_matches_dataclasses():
    readme = (ROOT / "README.md").read_text()
    assert C.options_markdown() in readme, "README option table drifted: regenerate with `plmrun config --markdown`"


def test_every_config_key_is_read_somewhere():
    """No dead options: each field name is read as an attribute outside config.py."""
    sources = "\n".join(p.read_text() for p in (ROOT / "plmrun").rglob("*.py") if p.name != "config.py")
    dead = []
    for section, cls in C._section_classes().items():
        for f in dataclasses.fields(cls):
            if not re.search(rf"\.{f.name}\b", sources):
                dead.append(f"{section}.{f.name}")
    assert not dead, f"config keys never read: {dead}"
