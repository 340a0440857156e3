"""Muon (and the whole optimizer) under 2-process DDP and FSDP2 equals single-process Muon (CPU, gloo).

One spawn of two ranks runs every case and saves what it got; the tests compare with the same
computation done here in one process. Three hidden matrices of different sizes over two ranks
exercise the partial last round; 5- and 11-row matrices give FSDP2 uneven shards.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from plmrun.config import OptimConfig
from plmrun.optim.build import build_optimizer
from plmrun.optim.muon import Muon

WORLD = 2
SHAPES = [(12, 8), (8, 20), (5, 7)]  # 3 matrices: not divisible by the world size; 5 rows shard 3/2
MOMENTA = (0.85, 0.9, 0.95)
CFG = dict(weight_decay=0.1, grad_clip=0.5, warmup=2, schedule="cosine", muon_momentum_warmup_steps=2)
# The opt-in cheaper orthogonalisation: Gram-side NS (15×6 is 2.5× taller than wide) and a polar factor
# reused on step 1 of 0..2, whose stored state must be the rank's own shard under FSDP2.
EXTRA = {
    "ddp": {},
    "fsdp": {},
    "ddp_cheap": dict(ns_gram=True, ns_every=2),
    "fsdp_cheap": dict(ns_gram=True, ns_every=2),
}


class TinyDist(nn.Module):
    """Three hidden matrices (15×6, 6×15, 5×6), odd-sized embedding/head, scalars."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.up = nn.Linear(6, 15)
        self.down = nn.Linear(15, 6, bias=False)
        self.q = nn.Parameter(torch.randn(5, 6) / 6**0.5)
        self.gain = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6, 11)

    def parameter_kinds(self):
        return {
            "embed.weight": "embed",
            "up.weight": "hidden",
            "up.bias": "scalar",
            "down.weight": "hidden",
            "q": "hidden",
            "gain": "scalar",
            "head.weight": "head",
            "head.bias": "head",
        }

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(F.relu(self.up(h)).square())
        h = h + (h @ self.q.T) @ self.q
        logits = self.head(F.rms_norm(h, (6,)) * self.gain)
        return F.cross_entropy(logits.flatten(0, -2), x.flatten())


def _data():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in MOMENTA]
    tokens = torch.randint(0, 11, (3, 2 * WORLD, 16), generator=g)  # 3 steps, 2 sequences per rank
    torch.manual_seed(1)
    return dict(weights=weights, grads=grads, tokens=tokens, model=TinyDist().state_dict())


def _muon_steps(params, grads, ns_dtype, wrap=lambda t: t):
    opt = Muon(params, lr=0.05, weight_decay=0.1, ns_dtype=ns_dtype)
    for mu, step_grads in zip(MOMENTA, grads):
        opt.param_groups[0]["momentum"] = mu
        for p, g in zip(params, step_grads):
            p.grad = wrap(g.clone())
        opt.step()


def _train(model, opt, tokens):
    for s, batch in enumerate(tokens):
        opt.set_step(s)
        model(batch).backward()
        opt.clip_gradients()
        opt.step()
        opt.zero_grad()


def _full(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


def _worker(rank, port, data, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    res = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # DDP condition: the same full gradient on every rank; NS work split over the ranks.
        params = [nn.Parameter(w.clone()) for w in data["weights"]]
        _muon_steps(params, data["grads"], dtype)
        res[f"replicated_{name}"] = [p.detach() for p in params]
        # FSDP2 condition: row-sharded DTensor parameters and gradients.
        params = [nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in data["weights"]]
        _muon_steps(params, data["grads"], dtype, wrap=lambda g: distribute_tensor(g, mesh, [Shard(0)]))
        res[f"sharded_{name}"] = [p.full_tensor() for p in params]
        res[f"local_shapes_{name}"] = [tuple(p.to_local().shape) for p in params]
    mine = data["tokens"][:, 2 * rank : 2 * rank + 2]  # each rank its half of every global batch
    for strategy, extra in EXTRA.items():
        model = TinyDist()
        model.load_state_dict(data["model"])
        if strategy.startswith("fsdp"):
            fully_shard(model, mesh=mesh)
            wrapped = model
        else:
            wrapped = DistributedDataParallel(model)
        opt = build_optimizer(model, OptimConfig(**CFG, **extra), max_steps=3, ns_dtype=torch.float32)
        _train(wrapped, opt, mine)
        res[f"train_{strategy}"] = _full(model)
        res[f"history_{strategy}"] = list(opt.grad_norm_history)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon_dist")
    data = _data()
    mp.spawn(_worker, args=(_free_port(), data, str(out)), nprocs=WORLD, join=True)
    return data, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_muon(data, dtype):
    params = [nn.Parameter(w.clone()) for w in data["weights"]]
    _muon_steps(params, data["grads"], dtype)
    return [p.detach() for p in params]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["replicated", "sharded"])
def test_distributed_muon_equals_single_process(runs, layout, dtype):
    """Same gradients in, so the split work and the full-matrix NS must reproduce the result bitwise."""
    data, ranks = runs
    single = _single_muon(data, torch.float32 if dtype == "fp32" else torch.bfloat16)
    for res in ranks:
        for got, want in zip(res[f"{layout}_{dtype}"], single):
            assert torch.equal(got, want)


def test_fsdp_shards_are_uneven(runs):
    _, ranks = runs
    assert [r["local_shapes_fp32"][2] for r in ranks] == [(3, 7), (2, 7)]


def test_sharded_muon_differs_from_per_shard_orthogonalisation(runs):
    """What torch.optim.Muon would do under FSDP2 (NS of each shard) is measurably different."""
    data, _ = runs
    g = data["grads"][0][0]
    from plmrun.optim.muon import newton_schulz

    per_shard = torch.cat([newton_schulz(c, 5, torch.float32) for c in g.chunk(WORLD)])
    assert (per_shard - newton_schulz(g, 5, torch.float32)).abs().max() > 0.05


@pytest.mark.parametrize("strategy", list(EXTRA))
def test_ddp_and_fsdp_training_equal_single_process(runs, strategy):
    """Full optimizer (Muon + AdamW, clipping, schedule) on a real DDP / fully_shard model, 3 steps."""
    data, ranks = runs
    model = TinyDist()
    model.load_state_dict(data["model"])
    opt = build_optimizer(model, OptimConfig(**CFG, **EXTRA[strategy]), max_steps=3, ns_dtype=torch.float32)
    _train(model, opt, data["tokens"])
    want = _full(model)
    for res in ranks:
        got = res[f"train_{strategy}"]
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=f"{strategy}: {n}")
        assert res[f"history_{strategy}"] == pytest.approx(opt.grad_norm_history, rel=1e-5)
    assert all(h > 0.5 for h in opt.grad_norm_history)  # grad_clip=0.5 was active on every step
