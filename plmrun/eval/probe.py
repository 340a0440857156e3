"""Frozen-embedding probes (the quality track): localisation, secondary structure, solubility.

Each task trains a scikit-learn probe on frozen embeddings (mean-pooled, or per residue for
secondary structure) and reports test accuracy as mean ± std over seeds. Every seed trains on a
different random 80% of the (capped) training rows; the test set is fixed. Two controls run with
the model: the same architecture randomly initialised (torch seed 0) and a model-free baseline
(amino-acid composition per sequence, one-hot residue identity per residue). Where the untrained
encoder is context-free (the speedrun preset: zero-initialised output projections) the two controls
are one, and the report says so; the majority-class rate is printed as its own row. Splits and caps are
deterministic hashes of ids, so every run sees the same sequences. `layer` probes another hidden
state than the final one; `layer="best"` probes every hidden state and reports each model at the one
that scores best on the training rows its seeds held out, so the test set never chooses.
"Model minus control" is a paired difference on the same test items with a 95% bootstrap interval
over test sequences: the seed std says how much the probe moves, not whether the model is better.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from plmrun import tokenizer as tok
from plmrun.data.tables import read_table
from plmrun.device import resolve_device
from plmrun.eval.embed import embed_sequences, num_hidden_states
from plmrun.eval.errors import EvalError
from plmrun.eval.flags import add_device_flag, add_window_flags, check_window_flags
from plmrun.eval.inference import EvalModel, load_eval_model
from plmrun.eval.metrics import BOOTSTRAP_RESAMPLES, paired_bootstrap
from plmrun.hashing import unit_hash
from plmrun.outputs import check_output_file, model_inputs

PROBE_DIR = Path(__file__).resolve().parent.parent / "probes"
HEADS = ("logistic", "ridge", "mlp")
TRAIN_FRACTION = 0.8
VALIDATION_ROWS = 20000  # held-out training rows (residues for per-residue tasks) that pick `--layer best`
SS3 = {"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}  # everything else (L, T, S, ...) -> coil (2)
OVERLAP_NOTE = "note: ~80% of the localisation sequences also occur in Swiss-Prot 2014 (the bundled pretraining corpus)"


@dataclass(frozen=True)
class Task:
    name: str
    per_residue: bool
    max_train: int  # sequences (domains for secondary structure)
    max_test: int
    max_train_residues: int = 0  # per-residue tasks: residues per seed


# Caps keep the suite for a small model and its control within ~10 minutes on a 2-core CPU
# (~1.9M tokens embedded per model, fp32). Localisation gets most of it: a small model's gain over
# its control there is ~2 points, which 200 test sequences (the old cap) cannot separate from noise
# and 1,000 can. Raise the caps with --max-train/--max-test on a GPU.
TASKS = {
    "localisation": Task("localisation", False, max_train=1500, max_test=1000),
    "secondary_structure": Task("secondary_structure", True, max_train=400, max_test=150, max_train_residues=20000),
    "solubility": Task("solubility", False, max_train=600, max_test=200),
}


@dataclass
class TaskData:
    train_seqs: list[str]
    train_labels: list  # ints, or int arrays per sequence for per-residue tasks
    test_seqs: list[str]
    test_labels: list
    classes: int


def _read_table(name: str) -> list[dict]:
    return read_table(PROBE_DIR / name, what="bundled probe").records()


def _cap(rows: list, key, n: int) -> list:
    return sorted(rows, key=lambda r: unit_hash(key(r)))[:n]


def load_task(task: Task) -> TaskData:
    """Train/test sequences and labels of a bundled task, split and capped deterministically."""
    if task.name == "localisation":
        rows = _read_table("scl2205_localisation.tsv.xz")
        acc = lambda r: r["accession"]
        train = _cap([r for r in rows if r["split"] == "trn"], acc, task.max_train)
        test = _cap([r for r in rows if r["split"] == "tst"], acc, task.max_test)
        lab = lambda r: int(r["label_id"])
        return TaskData(
            [r["sequence"] for r in train],
            [lab(r) for r in train],
            [r["sequence"] for r in test],
            [lab(r) for r in test],
            13,
        )
    if task.name == "secondary_structure":
        rows = _read_table("scope207_domains_dssp8.tsv.xz")
        is_test = lambda r: unit_hash("superfamily:" + r["sccs"].rsplit(".", 1)[0]) < 0.2
        ident = lambda r: r["id"]
        train = _cap([r for r in rows if not is_test(r)], ident, task.max_train)
        test = _cap([r for r in rows if is_test(r)], ident, task.max_test)
        ss3 = lambda r: np.array([SS3.get(c, 2) for c in r["dssp8"]], dtype=np.int64)
        return TaskData(
            [r["sequence"] for r in train],
            [ss3(r) for r in train],
            [r["sequence"] for r in test],
            [ss3(r) for r in test],
            3,
        )
    if task.name == "solubility":
        rows = _read_table("solvnet_solubility.csv.xz")
        is_test = lambda r: unit_hash("solubility:" + r["aa_seq"]) < 0.2
        seq = lambda r: r["aa_seq"]
        train = _cap([r for r in rows if not is_test(r)], seq, task.max_train)
        test = _cap([r for r in rows if is_test(r)], seq, task.max_test)
        return TaskData(
            [r["aa_seq"] for r in train],
            [int(r["label"]) for r in train],
            [r["aa_seq"] for r in test],
            [int(r["label"]) for r in test],
            2,
        )
    raise ValueError(f"unknown task {task.name!r} (tasks: {', '.join(TASKS)})")


# ---------------------------------------------------------------- features
def baseline_features(seqs: list[str], per_residue: bool) -> list | np.ndarray:
    """Amino-acid composition per sequence, or one-hot residue identity per residue (20 standard + other)."""
    lut = np.full(tok.VOCAB_SIZE, 20, dtype=np.int64)
    lut[tok.AMINO_ACID_IDS] = np.arange(20)
    onehots = [np.eye(21, dtype=np.float32)[lut[tok.encode(s)]] for s in seqs]
    return onehots if per_residue else np.stack([o.mean(0) for o in onehots])


CONTEXT_PROBE = ("ACDEFGHIKLMNPQRSTVWYX", "YWVTSRQPNMLKIHGFEDCAX", "AAKKAAKKWWMMGG")
"Sequences with every residue letter in different contexts (context_free's check)."


def context_free(model: EvalModel, layer: int | tuple | None = None) -> bool:
    """Whether `model`'s features at `layer` depend only on the residue itself, not its context.

    An untrained speedrun encoder (the default preset) is: its attention and MLP output projections
    start at zero, so every block adds 0 and each position's state is a function of its token alone
    (esm2 and esmc are not; hidden state 0, the embedding, is context-free in any model). Per-residue
    features are then a lookup of the residue (the one-hot baseline in another basis) and mean-pooled
    ones linear in the amino-acid composition: the random-init control and the baseline are one."""
    states = embed_sequences(model, list(CONTEXT_PROBE), pool="per-residue", layer=layer)
    seen: dict = {}
    for h, ids in zip(states, (tok.encode(s) for s in CONTEXT_PROBE)):
        for v, t in zip(h, ids):
            seen.setdefault(int(t), []).append(v)
    scale = max(1.0, max(float(np.abs(h).max()) for h in states))
    return all(float(np.abs(v - vs[0]).max()) <= 1e-5 * scale for vs in seen.values() for v in vs[1:])


def majority_class(train_labels: list, test_labels: list, per_residue: bool) -> dict:
    """The most frequent training class and how often it is right on the test items (the floor any
    probe must beat; a constant predictor)."""
    train = np.concatenate(train_labels) if per_residue else np.asarray(train_labels)
    test = np.concatenate(test_labels) if per_residue else np.asarray(test_labels)
    k = int(np.bincount(train).argmax())
    return {"class": k, "rate": float((test == k).mean())}


def model_features(
    model: EvalModel, seqs: list[str], per_residue: bool, token_budget: int, layer: int | tuple | None = None
):
    return embed_sequences(
        model, seqs, pool="per-residue" if per_residue else "mean", layer=layer, token_budget=token_budget
    )


# ---------------------------------------------------------------- probes
def make_head(head: str, seed: int):
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if head == "logistic":
        clf = LogisticRegression(C=1.0, max_iter=2000)
    elif head == "ridge":
        clf = RidgeClassifier(alpha=1.0)
    elif head == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256,), early_stopping=True, max_iter=200, random_state=seed)
    else:
        raise ValueError(f"unknown probe head {head!r} (heads: {', '.join(HEADS)})")
    return make_pipeline(StandardScaler(), clf)


@dataclass
class ProbeFit:
    scores: list[float]  # test accuracy per seed
    correct: np.ndarray  # per test item (residue for per-residue tasks): fraction of seeds right
    validation: list[float]  # per seed: accuracy on held-out training rows (empty unless asked)


def fit_and_score(task: Task, train_x, train_y, test_x, test_y, seeds, head: str, validation: bool = False) -> ProbeFit:
    """Train one probe per seed (each on its own random TRAIN_FRACTION of the training rows) and
    score it on the fixed test rows; with `validation`, also on (up to VALIDATION_ROWS of) the
    training rows that seed did not train on."""
    if task.per_residue:
        train_x, train_y = np.concatenate(train_x), np.concatenate(train_y)
        test_x, test_y = np.concatenate(test_x), np.concatenate(test_y)
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    test_x, test_y = np.asarray(test_x), np.asarray(test_y)
    scores, val_scores, correct = [], [], np.zeros(len(test_y))
    for seed in seeds:
        rng = np.random.default_rng(seed)
        n = int(round(TRAIN_FRACTION * len(train_y)))
        if task.per_residue and task.max_train_residues:
            n = min(n, task.max_train_residues)
        rows = rng.choice(len(train_y), size=n, replace=False)
        clf = make_head(head, seed).fit(train_x[rows], train_y[rows])
        right = clf.predict(test_x) == test_y
        scores.append(float(right.mean()))
        correct += right
        if validation:  # drawn after `rows`, so the training rows are the same with and without it
            held_out = rng.permutation(np.setdiff1d(np.arange(len(train_y)), rows))[:VALIDATION_ROWS]
            val_scores.append(float((clf.predict(train_x[held_out]) == train_y[held_out]).mean()))
    return ProbeFit(scores, correct / len(seeds), val_scores)


def paired_difference(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    item_sizes: list[int] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Accuracy of A minus B on the same test items, with a 95% bootstrap interval over test
    sequences (a per-residue task resamples whole sequences, since residues of one chain are not
    independent). `item_sizes` gives each sequence's number of items for per-residue tasks."""
    sizes = np.ones(len(correct_a), dtype=np.int64) if item_sizes is None else np.asarray(item_sizes)
    if not (len(correct_a) == len(correct_b) == sizes.sum() > 0):
        raise ValueError(
            f"paired_difference: {len(correct_a)} and {len(correct_b)} items, sizes sum to "
            f"{sizes.sum()}: need the same non-zero number"
        )
    seq_of_item = np.repeat(np.arange(len(sizes)), sizes)
    diff_per_seq = np.bincount(seq_of_item, weights=correct_a - correct_b, minlength=len(sizes))
    return paired_bootstrap(diff_per_seq, sizes, resamples, seed)


def best_layer_scores(
    task: Task, data: TaskData, model: EvalModel, seeds, head: str, token_budget: int
) -> tuple[ProbeFit, dict]:
    """Probe every hidden state; pick the one with the best held-out-training accuracy (never the
    test score). Returns its fit and a results row with every layer's validation and test means."""
    layers = tuple(range(num_hidden_states(model)))
    train = model_features(model, data.train_seqs, task.per_residue, token_budget, layers)
    test = model_features(model, data.test_seqs, task.per_residue, token_budget, layers)
    width = (train[0] if task.per_residue else train).shape[1] // len(layers)
    cols = lambda x, j: (
        [a[:, j * width : (j + 1) * width] for a in x] if task.per_residue else x[:, j * width : (j + 1) * width]
    )
    fits = {
        j: fit_and_score(
            task, cols(train, j), data.train_labels, cols(test, j), data.test_labels, seeds, head, validation=True
        )
        for j in layers
    }
    best = max(layers, key=lambda j: (np.mean(fits[j].validation), -j))  # ties: the earlier layer
    by_layer = {
        str(j): {"validation": float(np.mean(f.validation)), "test": float(np.mean(f.scores))} for j, f in fits.items()
    }
    return fits[best], {**score_row(fits[best].scores), "layer": best, "by_layer": by_layer}


def score_row(scores: list[float]) -> dict:
    return {"scores": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores))}


def run_probes(
    model: EvalModel,
    tasks=tuple(TASKS),
    *,
    seeds=(0, 1, 2),
    head: str = "logistic",
    caps: dict | None = None,
    token_budget: int = 8192,
    layer: int | str | None = None,
    log=print,
) -> dict:
    """Probe `model`, its random-init control and the baseline on each task; returns the results dict.

    `caps` optionally overrides task caps: {"max_train": n, "max_test": n, "max_train_residues": n}.
    `layer` picks the hidden state both models are probed at (as in `embed_sequences`; None = final);
    "best": each model's hidden state with the best accuracy on held-out training rows.
    """
    control = model.random_init(0)
    free = context_free(control, tuple(range(num_hidden_states(control))) if layer == "best" else layer)
    results = {
        "model": model.name,
        "head": head,
        "layer": -1 if layer is None else layer,
        "seeds": list(seeds),
        "max_length": model.max_length,
        "note": OVERLAP_NOTE,
        "random_init_context_free": free,
        "tasks": {},
    }
    t_all = time.perf_counter()
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
        task = replace(TASKS[name], **(caps or {}))
        t0 = time.perf_counter()
        data = load_task(task)
        fits, rows = {}, {}
        for label, net in (("model", model), ("random init", control)):
            if layer == "best":
                fits[label], rows[label] = best_layer_scores(task, data, net, seeds, head, token_budget)
            else:
                feats = [
                    model_features(net, s, task.per_residue, token_budget, layer)
                    for s in (data.train_seqs, data.test_seqs)
                ]
                fits[label] = fit_and_score(task, feats[0], data.train_labels, feats[1], data.test_labels, seeds, head)
                rows[label] = score_row(fits[label].scores)
        base_label = "one-hot" if task.per_residue else "aa composition"
        base = [baseline_features(s, task.per_residue) for s in (data.train_seqs, data.test_seqs)]
        fits[base_label] = fit_and_score(task, base[0], data.train_labels, base[1], data.test_labels, seeds, head)
        rows[base_label] = score_row(fits[base_label].scores)
        if free:  # the same control twice: say so (its fit differs only by the basis and the L2 penalty)
            rows["random init"]["same_as"] = base_label
        sizes = [len(y) for y in data.test_labels] if task.per_residue else None
        results["tasks"][name] = {
            "metric": "Q3 accuracy" if task.per_residue else "accuracy",
            "classes": data.classes,
            "n_train": len(data.train_seqs),
            "n_test": len(data.test_seqs),
            "n_test_residues": int(sum(len(s) for s in data.test_seqs)),
            "rows": rows,
            "majority_class": majority_class(data.train_labels, data.test_labels, task.per_residue),
            "model_minus": {
                other: paired_difference(fits["model"].correct, fits[other].correct, sizes)
                for other in ("random init", base_label)
            },
            "time_s": round(time.perf_counter() - t0, 1),
        }
        log(f"{name}: done in {time.perf_counter() - t0:.1f}s")
    results["time_s"] = round(time.perf_counter() - t_all, 1)
    return results


def format_table(results: dict) -> str:
    lines = [f"{'task':<20} {'features':<16} {'metric':<12} {'mean ± std':<16} train/test", "-" * 78]
    for name, t in results["tasks"].items():
        for label, r in t["rows"].items():
            lines.append(
                f"{name:<20} {label:<16} {t['metric']:<12} "
                f"{r['mean']:.4f} ± {r['std']:.4f}  {t['n_train']}/{t['n_test']}"
                + (f"  hidden state {r['layer']}" if "layer" in r else "")
                + (f"  = {r['same_as']}: one control (see below)" if "same_as" in r else "")
            )
        if "majority_class" in t:
            m = t["majority_class"]
            lines.append(
                f"{name:<20} {'majority class':<16} {t['metric']:<12} {m['rate']:.4f}"
                f"{'':<9}  {t['n_train']}/{t['n_test']}  (always class {m['class']}, the most "
                f"frequent in training)"
            )
        for other, d in t.get("model_minus", {}).items():
            lines.append(
                f"{name:<20} {'model - ' + other:<29} {d['diff']:+.4f}  95% CI "
                f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
            )
    if results.get("random_init_context_free"):
        lines.append(
            "random init = baseline: the untrained encoder's features here depend only on each residue's "
            "letter (the speedrun preset starts its attention and MLP output projections at zero, so every "
            "block adds 0; hidden state 0 is the embedding): a lookup per residue, linear in the amino-acid "
            "composition when mean-pooled, i.e. the one-hot / aa-composition baseline in another basis: "
            "one control, not two"
        )
    where = (
        "each model's best hidden state (picked on held-out training rows)"
        if results["layer"] == "best"
        else f"hidden state {results['layer']}"
    )
    lines.append(
        f"{results['head']} probe on {where}, {len(results['seeds'])} seeds, "
        f"{results['time_s']}s; differences are paired (same test items, accuracy averaged over "
        f"seeds), intervals from {BOOTSTRAP_RESAMPLES} bootstrap resamples of the test sequences; "
        f"{results['note']}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI
def add_probe_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe",
        help="frozen-embedding probes with random-init and baseline controls",
        description="Probe tasks: " + ", ".join(TASKS) + ". Prints mean ± std over seeds, and "
        "the model minus each control with a 95% bootstrap interval "
        "over test sequences.",
    )
    p.add_argument("model", help="run directory, checkpoint, EsmForMaskedLM folder or hub name")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--seeds", type=int, default=3, help="number of probe seeds (0..N-1)")
    p.add_argument("--head", choices=HEADS, default="logistic", help="probe: logistic regression, ridge or MLP")
    p.add_argument("--max-train", type=int, help="override every task's training-sequence cap")
    p.add_argument("--max-test", type=int, help="override every task's test-sequence cap")
    add_window_flags(p, longer="longer sequences are averaged over windows")
    p.add_argument(
        "--layer",
        type=_layer_arg,
        default=None,
        help="hidden state to probe, for the model and its control: 0 = embedding output, "
        "1..N = after block N, -1 = the final (normed) output, the default; 'best': each "
        "model's hidden state with the best accuracy on held-out training rows",
    )
    p.add_argument("--out", help="write the results (all per-seed scores) to this JSON file")
    add_device_flag(p)
    p.set_defaults(func=_run)
    return p


def _layer_arg(value: str) -> int | str:
    if value == "best":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'best', got {value!r}") from None


def _run(args) -> int:
    from plmrun.config import check_at_least

    check_at_least(args.seeds, 1, "--seeds")
    for flag, value, least in (("--max-train", args.max_train, 2), ("--max-test", args.max_test, 1)):
        if value is not None:
            check_at_least(value, least, flag)
    check_window_flags(args)
    caps = {k: v for k, v in (("max_train", args.max_train), ("max_test", args.max_test)) if v is not None}
    if args.out:
        check_output_file(args.out, model_inputs(args.model), error=EvalError)
    model = load_eval_model(args.model, device=resolve_device(args.device), max_length=args.max_length)
    try:
        results = run_probes(
            model,
            args.tasks,
            seeds=range(args.seeds),
            head=args.head,
            caps=caps,
            token_budget=args.token_budget,
            layer=args.layer,
            log=lambda m: print(m, file=sys.stderr),
        )
    except ValueError as e:
        raise EvalError(f"probe: {e}") from None
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0
