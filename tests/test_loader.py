import numpy as np
import pytest
import torch

from plmrun.data.loader import EvalBatches, TrainLoader
from plmrun.data.masking import IGNORE, Masker
from plmrun.data.shards import InMemorySequences
from plmrun.tokenizer import MASK


def random_source(lengths, seed=0):
    """Random residue ids 4..30 (every residue letter)."""
    rng = np.random.default_rng(seed)
    return InMemorySequences([rng.integers(4, 31, n).astype(np.uint8) for n in lengths])


def protein_source(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return random_source(np.clip(rng.lognormal(np.log(120), 0.8, n), 1, 900).astype(np.int64), seed)


SRC = protein_source()
MANY_SHORT = random_source(np.random.default_rng(1).integers(1, 80, 4000))  # 2 packing chunks per epoch


def loader(source=SRC, **kw):
    args = dict(token_budget=512, max_length=128, seed=3, masker=Masker(), prefetch=0)
    args.update(kw)
    return TrainLoader(source, **args)


def key(b):
    return (b.packed.seq_index.tolist(), b.packed.crop_start.tolist(), b.inputs.tolist(), b.targets.tolist())


def run(steps, start=0, **kw):
    with loader(**kw) as ld:
        return [[key(b) for b in ld.next_step(s)] for s in range(start, start + steps)]


def test_world_size_times_accumulation_gives_the_same_stream():
    single = run(6, grad_accum=4)
    ranks = [run(6, world_size=2, rank=r, grad_accum=2) for r in range(2)]
    four = [run(6, world_size=4, rank=r) for r in range(4)]
    for s in range(6):
        assert single[s] == ranks[0][s] + ranks[1][s] == sum((four[r][s] for r in range(4)), [])
    # ranks are disjoint within a step
    assert not set(map(str, ranks[0][0])) & set(map(str, ranks[1][0]))


def test_epochs_cover_every_sequence_once_and_roll_over():
    ld = loader(grad_accum=1)
    seen = []
    while ld.epoch == 0:
        (b,) = ld.next_step(len(seen))
        seen.append(b.packed.seq_index.tolist())
    assert sorted(sum(seen, [])) == list(range(len(SRC)))
    (b,) = ld.next_step(len(seen))  # first batch of epoch 1
    assert b.packed.seq_index.tolist() != seen[0]


def test_prefetch_and_workers_do_not_change_the_stream():
    ref = run(8, grad_accum=2)
    assert run(8, grad_accum=2, prefetch=4, num_workers=1) == ref
    assert run(8, grad_accum=2, prefetch=7, num_workers=3) == ref


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_reproduces_the_remaining_batches(prefetch):
    kw = dict(source=MANY_SHORT, grad_accum=2, prefetch=prefetch, num_workers=2)
    full = run(230, **kw)
    with loader(**kw) as ld:
        assert ld.plan.num_chunks == 2
        for s in range(40):
            ld.next_step(s)
        state = ld.state_dict()
        assert state["chunk"] == 0 and state["epoch"] == 0
    assert all(isinstance(v, int) for v in state.values())
    with loader(**kw) as ld:
        ld.load_state_dict(state)
        rest = [[key(b) for b in ld.next_step(s)] for s in range(40, 230)]
        assert ld.epoch >= 1  # crossed the chunk and the epoch boundary
    assert rest == full[40:]
    # a 1 x 2 state resumes as 2 x 1 on the same stream
    halves = []
    for r in range(2):
        with loader(source=MANY_SHORT, world_size=2, rank=r, prefetch=prefetch) as ld:
            ld.load_state_dict(state)
            halves.append([[key(b) for b in ld.next_step(s)] for s in range(40, 43)])
    assert [halves[0][i] + halves[1][i] for i in range(3)] == full[40:43]


def test_resume_refuses_a_different_stream():
    state = loader().state_dict()
    for kw in ({"seed": 4}, {"token_budget": 1024}, {"max_length": 256}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            loader(**kw).load_state_dict(state)


def test_masks_follow_the_requested_step_with_background_threads():
    masker = Masker(mask_rate=0.05, mask_rate_end=0.5, ramp_steps=4)
    with loader(masker=masker, prefetch=6, num_workers=2, grad_accum=2) as ld:
        rates = []
        for step in [0, 1, 2, 3, 10, 11, 2]:  # jumps force re-masking of prefetched work
            bs = ld.next_step(step)
            rates.append(sum(b.normalizer for b in bs) / sum((b.packed.tokens >= 4).sum().item() for b in bs))
            for j, b in enumerate(bs):  # identical to masking in the caller's thread
                again = masker(b.packed, seed=3, index=ld.state_dict()["microbatch"] - 2 + j, step=step)
                assert torch.equal(again.inputs, b.inputs)
    expected = [masker.rate(s) for s in [0, 1, 2, 3, 10, 11, 2]]
    assert np.allclose(rates, expected, atol=0.06)


def test_packing_efficiency_is_reported():
    with loader(grad_accum=2) as ld:
        bs = [b for s in range(5) for b in ld.next_step(s)]
        eff = sum(b.packed.num_real_tokens for b in bs) / (512 * len(bs))
        assert ld.packing_efficiency == pytest.approx(eff) and 0.5 < eff <= 1


def test_eval_batches_are_fixed_and_split_over_ranks():
    src = random_source([30, 2000, 5, 400, 1100, 60, 700, 90, 10, 1500, 250], seed=8)

    def per_sequence(budget, world):
        out = {}
        for r in range(world):
            for b in EvalBatches(
                src, token_budget=budget, max_length=1024, eval_seed=7, mask_rate=0.15, world_size=world, rank=r
            ):
                cu = b.packed.cu_seqlens.tolist()
                for k, i in enumerate(b.packed.seq_index.tolist()):
                    assert i not in out
                    out[i] = (
                        b.inputs[cu[k] : cu[k + 1]].tolist(),
                        b.targets[cu[k] : cu[k + 1]].tolist(),
                        int(b.packed.crop_start[k]),
                    )
        return out

    ref = per_sequence(1024, 1)
    assert sorted(ref) == list(range(len(src)))
    assert per_sequence(4096, 1) == ref and per_sequence(2048, 3) == ref and per_sequence(1024, 2) == ref
    assert ref[1][2] > 0 and ref[0][2] == 0  # long sequences: one fixed window
    assert all(t == IGNORE or i == MASK for s in ref.values() for i, t in zip(s[0], s[1]))
    one = EvalBatches(src, token_budget=1024, max_length=1024, eval_seed=7, mask_rate=0.15)
    order = [i for b in one for i in b.packed.seq_index.tolist()]
    assert order == list(range(len(src)))  # dataset order
    real = sum(b.packed.num_real_tokens for b in one)
    assert one.padding_fraction == pytest.approx(1 - real / (len(one) * 1024))
    sub = EvalBatches(src, token_budget=1024, max_length=1024, eval_seed=7, mask_rate=0.15, subset=4)
    assert [i for b in sub for i in b.packed.seq_index.tolist()] == [0, 1, 2, 3]


@pytest.mark.cuda
def test_cuda_pinned_copies_match_cpu():
    cpu = run(3, grad_accum=2)
    with loader(grad_accum=2, prefetch=4, pin_memory=True, device="cuda") as ld:
        for s in range(3):
            bs = ld.next_step(s)
            assert all(b.inputs.is_cuda and b.packed.cu_seqlens.is_cuda for b in bs)
            assert [key(b.to("cpu")) for b in bs] == cpu[s]


SCHEDULE = [[0, 64], [30, 256]]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_crop_schedule_switches_at_its_step_and_resumes_after_the_switch(prefetch):
    kw = dict(
        source=MANY_SHORT,
        grad_accum=2,
        prefetch=prefetch,
        num_workers=2,
        token_budget=512,
        max_length_schedule=SCHEDULE,
    )
    full = run(60, **kw)
    assert full[:30] == run(30, source=MANY_SHORT, grad_accum=2, max_length=64)  # phase 0 = a plain 64-token run
    with loader(**kw) as ld:
        for s in range(29):
            ld.next_step(s)
        assert ld.plan.max_length == 64
        ld.next_step(29)
        ld.next_step(30)
        assert ld.plan.max_length == 256 and ld.epoch == 1  # the switch started the next epoch
        for s in range(31, 41):
            ld.next_step(s)
        state = ld.state_dict()
    assert state["phase"] == 1 and state["max_length_schedule"] == SCHEDULE
    with loader(**kw) as ld:
        ld.load_state_dict(state)
        assert [[key(b) for b in ld.next_step(s)] for s in range(41, 60)] == full[41:]
    with pytest.raises(ValueError, match="max_length_schedule"):  # a different schedule's stream
        loader(**{**kw, "max_length_schedule": [[0, 64], [31, 256]]}).load_state_dict(state)
    with pytest.raises(ValueError, match="max_length_schedule"):  # a state without a schedule
        loader(**kw).load_state_dict(loader(source=MANY_SHORT, max_length=64).state_dict())


def _segments(b):
    cu = b.packed.cu_seqlens[: b.packed.num_sequences + 1]
    return (cu[1:] - cu[:-1]).tolist()


def test_crop_schedule_makes_longer_windows_after_the_switch():
    src = random_source([700, 30, 900, 50] * 20)
    with loader(source=src, token_budget=1024, max_length_schedule=[[0, 100], [3, 1000]]) as ld:
        before = [n for s in range(3) for b in ld.next_step(s) for n in _segments(b)]
        after = [n for s in range(3, 12) for b in ld.next_step(s) for n in _segments(b)]
    assert max(before) == 100 and max(after) == 902  # the 900-residue sequence whole


def test_chunked_eval_windows_score_every_residue_once():
    src = random_source([30, 2000, 5, 400, 1100, 60, 700], seed=3)
    chunks = EvalBatches(src, token_budget=1024, max_length=256, eval_seed=7, mask_rate=0.15, windows="chunk")
    seen = {}
    for b in chunks:
        cu = b.packed.cu_seqlens.tolist()
        for k, (i, s) in enumerate(zip(b.packed.seq_index.tolist(), b.packed.crop_start.tolist())):
            assert cu[k + 1] - cu[k] <= 256
            seen.setdefault(i, []).append((s, cu[k + 1] - cu[k] - 2))
    for i, parts in seen.items():  # consecutive windows tile the sequence
        assert [s for s, _ in parts] == list(range(0, len(parts) * 254, 254))
        assert sum(n for _, n in parts) == src.lengths[i]
    assert sorted(seen) == list(range(len(src))) and len(seen[1]) == 8
    # masks depend on the residue's place in the whole sequence: the same residues are masked whatever the window
    crop = EvalBatches(src, token_budget=4096, max_length=2048, eval_seed=7, mask_rate=0.15)
    masked = lambda batches: sorted((i, s + p) for b in batches for i, s, p in _targets(b))
    assert masked(chunks) == masked(crop)
    with pytest.raises(ValueError, match="windows"):
        EvalBatches(src, token_budget=1024, max_length=256, eval_seed=7, mask_rate=0.15, windows="slide")


def _targets(b):
    cu = b.packed.cu_seqlens.tolist()
    for k, (i, s) in enumerate(zip(b.packed.seq_index.tolist(), b.packed.crop_start.tolist())):
        for p in (b.targets[cu[k] : cu[k + 1]] != IGNORE).nonzero().flatten().tolist():
            yield i, s, p - 1


def test_packing_efficiency_survives_a_resume():
    with loader() as ld:
        for s in range(3):
            ld.next_step(s)
        state, eff = ld.state_dict(), ld.packing_efficiency
    with loader() as again:
        again.load_state_dict(state)
        assert again.packing_efficiency == eff
    old = {k: v for k, v in state.items() if k not in ("real_tokens", "budget_tokens")}  # an older checkpoint
    with loader() as again:
        again.load_state_dict(old)
        assert again.packing_efficiency != again.packing_efficiency  # nan: nothing counted yet
