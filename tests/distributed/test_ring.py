"""Ring attention's local pieces against the dense reference (in-process; the multi-process runs are in
test_context_parallel.py): the chunk-level schedule, the ring plan (which pairs run, which shards travel) and
the per-pair backward with the global log-sum-exp."""

import pytest
import torch

from headwise.core.reference import naive_attention
from headwise.distributed import head_parallel_attention, ring, ring_attention
from headwise.distributed.ring import build_ring_plan, chunk_states, pair_backward
from headwise.distributed.sharding import ShardLayout
from headwise.patterns import Causal, Neighborhood, PerHead, SlidingWindow

PATTERNS = {
    "full": lambda n: None,
    "causal": lambda n: Causal(),
    "window4": lambda n: SlidingWindow(4),
    "causal-window3": lambda n: SlidingWindow(3, causal=True),
    "neighborhood-k7": lambda n: Neighborhood(grid=(n,), kernel_size=7),
    "perhead": lambda n: PerHead([Causal(), SlidingWindow(2), Causal(offset=-3), SlidingWindow(1, causal=True)]),
}


def dense(pattern, n):  # (heads or 1, n, n) bool
    return torch.ones(1, n, n, dtype=torch.bool) if pattern is None else pattern.dense_mask(n, n)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("n,world", [(37, 2), (37, 4), (5, 4), (64, 4)], ids=["N37-P2", "N37-P4", "N5-P4", "N64-P4"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_plan_covers_exactly_the_pattern(name, n, world, layout):
    if name == "neighborhood-k7" and n < 7:
        pytest.skip("kernel larger than the sequence")
    pattern = PATTERNS[name](n)
    lay = ShardLayout(n, world, layout)
    mask = dense(pattern, n).any(0)  # (n, n) union over heads
    states = chunk_states(pattern, lay)
    c = lay.chunk
    for i in range(lay.n_chunks):
        for j in range(lay.n_chunks):
            block = mask[i * c:(i + 1) * c, j * c:(j + 1) * c]
            want = 0 if block.numel() == 0 or not block.any() else (2 if dense(pattern, n)[:, i * c:(i + 1) * c, j * c:(j + 1) * c].all() else 1)
            assert int(states[i, j]) == want, (i, j)
    plan = build_ring_plan(pattern, lay)
    heads = 1 if pattern is None or pattern.heads is None else pattern.heads
    covered = torch.zeros(heads, n, n, dtype=torch.int64)
    for r in range(world):
        for o in range(world):
            pos_q, pos_k = lay.positions(r), lay.positions(o)
            assert bool(plan.need[r, o]) == bool(mask[pos_q[pos_q < n]][:, pos_k[pos_k < n]].any())
            for qi, ql, ki, kl, sub in plan.tasks[r][o]:
                qo, ko = qi * lay.chunk, ki * lay.chunk
                gq, gk = pos_q[qo:qo + ql], pos_k[ko:ko + kl]
                for h in range(heads):
                    local = torch.ones(ql, kl, dtype=torch.bool) if sub is None else \
                        sub.mask(torch.arange(ql)[:, None], torch.arange(kl)[None], None if sub.heads is None else h)
                    covered[h, gq[:, None], gk[None, :]] += local.long()
    assert torch.equal(covered, dense(pattern, n).long().expand(heads, n, n))  # every attended pair exactly once


@pytest.mark.parametrize("name,layout,last", [
    ("full", "zigzag", (3, 3, 3, 3)),
    ("causal", "contiguous", (3, 2, 1, 0)),  # shard o is needed by the ranks after it only
    ("causal-window3", "contiguous", (1, 1, 1, 0)),  # one hop; the last shard never travels
    ("causal", "zigzag", (3, 3, 3, 3)),
])
def test_shards_travel_only_while_needed(name, layout, last):
    plan = build_ring_plan(PATTERNS[name](64), ShardLayout(64, 4, layout))
    assert plan.last == last


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
@pytest.mark.parametrize("name", ["full", "causal", "window4", "perhead"])
def test_pair_backward_sums_to_the_full_gradient(name, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(ring, "use_kernel", lambda q: False)
    torch.manual_seed(0)
    n, split = 37, 20
    pattern = PATTERNS[name](n)
    q = torch.randn(2, 4, n, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, n, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, n, 6, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 4, n, 6, dtype=torch.float64)
    out, lse = naive_attention(q, k, v, pattern)
    want = torch.autograd.grad((out * dout).sum(), (q, k, v))
    delta = (dout * out).sum(-1)
    scale = 8 ** -0.5
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for k0, k1 in ((0, split), (split, n)):  # two key subsets, seen through their offset
        sub = None if pattern is None else ring.OffsetPattern(pattern, 0, k0)
        gq, gk, gv = pair_backward(q.detach(), k.detach()[:, :, k0:k1], v.detach()[:, :, k0:k1], dout, lse, delta,
                                   sub, scale)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    for got, ref in zip((dq, torch.cat(dks, 2), torch.cat(dvs, 2)), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("fn", [ring_attention, head_parallel_attention], ids=["ring", "heads"])
def test_cross_attention_shards_are_refused(fn):
    q = torch.zeros(1, 2, 8, 4)
    k = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="self-attention"):
        fn(q, k, k)
