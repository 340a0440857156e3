"""No command deletes or overwrites what it did not write (issue 25).

The repro: `plmrun data prepare inp/small.fa --out inp --overwrite` emptied inp/ (the input and an
unrelated precious.txt). Every command with an output goes through plmrun/outputs.py; each case here
runs the real command and checks both the one-line refusal and that the files are still there.
"""

import pytest
import torch

from plmrun.cli import main
from plmrun.config import ModelConfig
from plmrun.data.errors import DataError
from plmrun.data.prepare import prepare
from plmrun.model.loading import save_model_dir
from plmrun.model.registry import build_model
from plmrun.outputs import (
    MARKER,
    OutputError,
    check_output_dir,
    check_output_file,
    read_marker,
)

FASTA = ">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMSTNPKPQRKTKRNTNRRPQDVKFPGG\n>c\nMKVLAAGIVGLLLAQ\n"


def _inp(tmp_path):
    inp = tmp_path / "inp"
    inp.mkdir()
    (inp / "small.fa").write_text(FASTA)
    (inp / "precious.txt").write_text("mine")
    return inp


def _refused(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    return err


def _intact(inp):
    assert (inp / "small.fa").read_text() == FASTA and (inp / "precious.txt").read_text() == "mine"


def test_prepare_over_the_folder_holding_its_input_is_refused(tmp_path, capsys):
    inp = _inp(tmp_path)
    _refused(
        capsys,
        ["data", "prepare", str(inp / "small.fa"), "--out", str(inp), "--overwrite"],
        f"--out {inp}: holds the input {inp / 'small.fa'}",
    )
    _intact(inp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inp"]  # no temp folder left either


def test_overwrite_replaces_only_a_folder_plmrun_made_and_names_foreign_files(tmp_path, capsys):
    inp = _inp(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    _refused(
        capsys,
        ["data", "prepare", str(inp / "small.fa"), "--out", str(other), "--overwrite"],
        "not a folder plmrun created",
        "notes.txt",
    )
    assert (other / "notes.txt").read_text() == "x"
    ds = tmp_path / "ds"
    assert main(["data", "prepare", str(inp / "small.fa"), "--out", str(ds)]) == 0
    assert read_marker(ds) == {"train"}
    assert main(["data", "prepare", str(inp / "small.fa"), "--out", str(ds), "--overwrite"]) == 0  # ours: replaced
    (ds / "precious.txt").write_text("mine")
    _refused(
        capsys,
        ["data", "prepare", str(inp / "small.fa"), "--out", str(ds), "--overwrite"],
        "holds files plmrun did not write there (precious.txt)",
    )
    assert (ds / "precious.txt").read_text() == "mine" and (ds / "train" / "manifest.json").is_file()
    _intact(inp)


def test_output_inside_an_input_folder_or_equal_to_an_input_is_refused(tmp_path):
    inp = _inp(tmp_path)
    (inp / "state.json").write_text("{}")  # a saved Hugging Face dataset folder, as input_kind tells them
    with pytest.raises(DataError, match="lies inside the input folder"):
        prepare(str(inp), inp / "sub", progress=False)  # a folder input (saved HF dataset) and an output in it
    with pytest.raises(OutputError, match="is the input"):
        check_output_file(inp / "small.fa", [inp / "small.fa"])
    with pytest.raises(OutputError, match="is the input"):
        check_output_dir(inp, [inp], overwrite=True)
    assert check_output_file(tmp_path / "new.json", [inp / "small.fa"]) == tmp_path / "new.json"
    _intact(inp)


@pytest.fixture
def model(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2)
    save_model_dir(tmp_path / "model", build_model(cfg).state_dict(), cfg)
    return tmp_path / "model"


def test_export_overwrite_keeps_foreign_folders_and_never_writes_into_its_input(tmp_path, model, capsys):
    inp = _inp(tmp_path)
    _refused(
        capsys, ["export", str(model), "--out", str(inp), "--overwrite"], "not a folder plmrun created", "precious.txt"
    )
    _intact(inp)
    _refused(capsys, ["export", str(model), "--out", str(model), "--overwrite"], f"--out {model}: is the input")
    assert (model / "model.safetensors").is_file()
    hf = tmp_path / "hf"
    assert main(["export", str(model), "--out", str(hf)]) == 0
    assert main(["export", str(model), "--out", str(hf), "--overwrite"]) == 0  # its own export: replaced
    (hf / "keep.txt").write_text("x")
    _refused(capsys, ["export", str(model), "--out", str(hf), "--overwrite"], "keep.txt")
    assert (hf / "keep.txt").is_file()


@pytest.mark.parametrize("command", ["embed", "zeroshot --out", "zeroshot --json", "probe", "eval", "finetune"])
def test_an_output_file_that_is_an_input_is_refused_before_any_work(tmp_path, model, capsys, command):
    inp = _inp(tmp_path)
    fasta, dms = inp / "small.fa", tmp_path / "dms.csv"
    dms.write_text("mutant,DMS_score\nM1A,0.1\nK2L,0.4\nQ11W,-0.3\nS17P,0.2\n")
    target = {
        "embed": fasta,
        "zeroshot --out": dms,
        "zeroshot --json": fasta,
        "probe": model / "config.json",
        "eval": model / "model.safetensors",
        "finetune": model / "MANIFEST.json",
    }[command]
    before = target.read_bytes()
    flag = "--json" if command == "zeroshot --json" else "--out"
    argv = {
        "embed": ["embed", str(model), str(fasta)],
        "zeroshot --out": ["zeroshot", str(model), "--dms", str(dms), "--wildtype", str(fasta)],
        "probe": ["probe", str(model)],
        "eval": ["eval", str(model)],
        "finetune": ["finetune", str(model)],
    }[command.replace(" --json", " --out")]
    _refused(capsys, [*argv, flag, str(target), "--device", "cpu"], str(target))
    assert target.read_bytes() == before


def test_data_cat_onto_a_shard_of_its_dataset_is_refused(tmp_path, capsys):
    inp = _inp(tmp_path)
    ds = tmp_path / "ds"
    prepare(str(inp / "small.fa"), ds, progress=False)
    shard = next((ds / "train").glob("*.bin"))
    before = shard.read_bytes()
    _refused(capsys, ["data", "cat", str(ds), "--split", "train", "--out", str(shard)], "lies inside the input folder")
    assert shard.read_bytes() == before


def test_embed_never_removes_a_partial_folder_it_did_not_make(tmp_path, model, capsys):
    inp = _inp(tmp_path)
    partial = tmp_path / "e.safetensors.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("x")
    _refused(
        capsys,
        ["embed", str(model), str(inp / "small.fa"), "--out", str(tmp_path / "e.safetensors"), "--device", "cpu"],
        f"{partial}: exists and is not an unfinished embed",
    )
    assert (partial / "mine.txt").read_text() == "x"


def test_train_never_replaces_a_run_folder_holding_foreign_files(tmp_path):
    from test_train import TINY, _plmrun

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {hidden_size: 64}\n")  # another config, no checkpoint: replaceable
    (run / "notes.txt").write_text("mine")
    proc = _plmrun(["train", *TINY, "--logging.name=r", "--train.max_steps=1"], tmp_path, check=False)
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()  # without it, the dead run of another config is replaced as before
    _plmrun(["train", *TINY, "--logging.name=r", "--train.max_steps=1", "--train.eval_every=1"], tmp_path)
    assert (run / "summary.json").is_file()
    assert MARKER not in {p.name for p in run.iterdir()}
