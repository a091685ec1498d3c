"""Ring and head-parallel attention and ContextParallel on real process groups: one run of 4 gloo CPU
processes spawned from pytest computes every check on the world (P = 4), then on two 2-rank subgroups (P = 2,
ranks {0, 1} and {2, 3}: group ranks differ from global ranks), then rank 1 raises; the tests read the results.

Each check: float64, the full q, k, v identical on every rank (same seed); each rank shards them, runs the
distributed attention, gathers the output and backpropagates the loss of its own shard; the gradients of the
full tensors, summed over ranks, and the gathered output must equal single-process ``headwise.attention``
to 1e-10, at lengths not divisible by the rank count (padding) and at N = 1 (ranks holding only padding).
"""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import headwise
from headwise.arena import data_parallel_train
from headwise.parallel import ContextParallel
from headwise.distributed import (count_communication, gather_sequence,
                                  head_parallel_attention, ring_attention, run_local, shard_sequence)
from headwise.distributed.ring import ring_plan
from headwise.distributed.sharding import ShardLayout
from headwise.patterns import Causal, Neighborhood, SlidingWindow

from .test_ring import PATTERNS as RING_PATTERNS

TOL = 1e-10
METHODS = {"ring": ring_attention, "heads": head_parallel_attention}
PATTERNS = {**RING_PATTERNS, "neighborhood2d-k3": lambda n: Neighborhood(grid=(5, n // 5), kernel_size=3)}
# (method, pattern, layout, N, kv_heads): q has 4 heads; kv_heads 2 is GQA, 1 MQA (head-parallel replicates k, v)
CASES = [(m, p, lay, 37, 2) for m in METHODS for p in PATTERNS if p != "neighborhood2d-k3"
         for lay in ("zigzag", "contiguous")]
CASES += [(m, "neighborhood2d-k3", "zigzag", 35, 2) for m in METHODS]
CASES += [(m, p, "zigzag", 1, 2) for m in METHODS for p in ("full", "causal")]
CASES += [(m, "causal", "zigzag", 64, kv) for m in METHODS for kv in (1, 4)]
WRAPPED = [(m, v) for m in METHODS for v in ("mha", "gqa", "mqa")]


def case_id(case):
    m, p, lay, n, kv = case
    return f"{m}-{p}-{lay}-N{n}-Hkv{kv}"


def _check_attention(case, group):
    method, name, layout, n, kv_heads = case
    pattern = PATTERNS[name](n)
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, h, n, d, dtype=torch.float64, generator=g).requires_grad_()
               for h, d in ((4, 8), (kv_heads, 8), (kv_heads, 6)))  # Dv = 6 differs from D = 8
    dout = torch.randn(2, 4, n, 6, dtype=torch.float64, generator=g)
    ref = headwise.attention(q, k, v, pattern)
    ref_grads = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    shards = [shard_sequence(t, layout=layout, group=group) for t in (q, k, v, dout)]
    out = METHODS[method](*shards[:3], pattern, group, seq_len=n, layout=layout)
    grads = torch.autograd.grad((out * shards[3]).sum(), (q, k, v))  # this rank's tokens' loss only
    err = (gather_sequence(out, layout=layout, group=group, seq_len=n) - ref).abs().max().item()
    for got, want in zip(grads, ref_grads):
        got = got.clone()
        dist.all_reduce(got, group=group)  # the whole sequence's gradient
        err = max(err, (got - want).abs().max().item())
    return err


def _check_wrapped(method, variant, group):
    torch.manual_seed(0)
    m = headwise.create(variant, dim=16, heads=4, kv_heads=2 if variant == "gqa" else None,
                        pattern=Causal()).double()
    x = torch.randn(2, 29, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ref = m(x)
    (ref ** 2).sum().backward()
    ref_grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    cp = ContextParallel(m, method=method, group=group)
    out = cp(shard_sequence(x, dim=1, group=group), seq_len=29)  # (2, n, 16)
    real = shard_sequence(torch.ones_like(x), dim=1, group=group)  # padded rows carry no loss
    (out ** 2 * real).sum().backward()
    cp.sync_gradients()
    err = (gather_sequence(out, dim=1, group=group, seq_len=29) - ref).abs().max().item()
    for name, p in m.named_parameters():
        err = max(err, (p.grad - ref_grads[name]).abs().max().item())
    return err


def _skip_volume(group):
    """Forward bytes each rank sends: a causal window on the contiguous layout passes each shard one hop (the
    last rank's shard never travels), full attention passes every shard P - 1 hops."""
    n = 64
    x = torch.randn(1, 2, n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shard = shard_sequence(x, layout="contiguous", group=group)
    sent = {}
    for name, pattern in (("full", None), ("causal-window3", SlidingWindow(3, causal=True))):
        with count_communication() as c:
            ring_attention(shard, shard, shard, pattern, group, seq_len=n, layout="contiguous")
        sent[name] = c.bytes_sent
    plan = ring_plan(SlidingWindow(3, causal=True), ShardLayout(n, dist.get_world_size(group), "contiguous"))
    return sent, 2 * shard.numel() * 8, plan.last


class _Stop(Exception):
    pass


def _check_ddp(group, folder):
    """Data-parallel training of a small arena LM vs one process on the whole batch; then the same run
    interrupted at step 2 (rank 0 writes the checkpoint) and resumed by fresh models on every rank."""
    from headwise.arena.models import build_lm
    from headwise.arena.train import train

    def make():
        torch.manual_seed(0)
        return build_lm("mha", vocab=16, dim=16, depth=1, heads=2, max_len=12).double()

    def batch_fn(step):  # the global batch: 8 sequences, the same on every rank
        x = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(step))
        return x, torch.roll(x, -1, 1)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def stop_at_2(step):
        if step == 2:
            raise _Stop
        return batch_fn(step)

    def diff(a, b):
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))

    kw = dict(steps=4, lr=1e-2, warmup=1, seed=0)
    ref = make()
    train(ref, batch_fn, loss_fn, **kw)
    model = make()
    data_parallel_train(model, batch_fn, loss_fn, group=group, **kw)
    leader = dist.get_global_rank(group if group is not None else dist.group.WORLD, 0)
    ckpt = Path(folder) / f"ddp-P{dist.get_world_size(group)}-leader{leader}.pt"
    try:
        data_parallel_train(make(), stop_at_2, loss_fn, group=group, checkpoint=ckpt, **kw)
    except _Stop:
        pass
    resumed = make()
    result = data_parallel_train(resumed, batch_fn, loss_fn, group=group, checkpoint=ckpt, **kw)
    return diff(model, ref), diff(resumed, ref), result.resumed_from


def _deliberate_failure(rank, group):
    """Rank 1 raises instead of joining the ring; rank 0 must fail with a clear error, not hang."""
    x = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    t0 = time.monotonic()
    shard = shard_sequence(x, group=group)
    try:
        ring_attention(shard, shard, shard, Causal(), group)
    except RuntimeError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


def _checks(group, folder):
    return {"attention": {case_id(c): _check_attention(c, group) for c in CASES},
            "wrapped": {f"{m}-{v}": _check_wrapped(m, v, group) for m, v in WRAPPED},
            "volume": _skip_volume(group),
            "ddp": _check_ddp(group, folder)}


def check_all(rank, world, folder):
    results = {4: _checks(None, folder)}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in the same order
    pair = pairs[rank // 2]
    results[2] = _checks(pair, folder)
    if rank < 2:
        results["failure"] = _deliberate_failure(rank, pair)
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_local(check_all, 4, str(tmp_path_factory.mktemp("ddp")), timeout=300, pg_timeout=60)


def test_every_rank_finished(run):
    for r in run:
        if r.rank == 1:
            assert not r.ok and "deliberate failure on rank 1" in r.error, r.error
        else:
            assert r.ok, f"rank {r.rank}: {r.error}\n{r.traceback}"


def _results(run, rank=0):
    if not run[rank].ok:
        pytest.fail(f"rank {rank} failed: {run[rank].error}\n{run[rank].traceback}")
    return run[rank].value


RANKS = pytest.mark.parametrize("world,rank", [(4, 0), (2, 0), (2, 2)], ids=["P4", "P2", "P2-ranks23"])


@RANKS
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_output_and_gradients_match_single_process(run, case, world, rank):
    assert _results(run, rank)[world]["attention"][case_id(case)] < TOL


@RANKS
@pytest.mark.parametrize("method,variant", WRAPPED, ids=lambda x: x)
def test_context_parallel_module_matches(run, method, variant, world, rank):
    assert _results(run, rank)[world]["wrapped"][f"{method}-{variant}"] < TOL


@pytest.mark.parametrize("world", [4, 2], ids=["P4", "P2"])
def test_skipped_steps_send_nothing(run, world):
    sent, kv_bytes, last = _results(run)[world]["volume"]
    assert sent["full"] == (world - 1) * kv_bytes
    assert last == (1,) * (world - 1) + (0,)
    assert sent["causal-window3"] == kv_bytes  # rank 0: one hop; everything else skipped


@RANKS
def test_data_parallel_training_matches_one_process_on_the_whole_batch(run, world, rank):
    trained, resumed, resumed_from = _results(run, rank)[world]["ddp"]
    assert trained < 1e-10
    assert resumed_from == 2  # the checkpoint rank 0 wrote when step 2 raised
    assert resumed < 1e-10


def test_a_rank_that_raises_fails_the_others_clearly(run):
    message, seconds = _results(run)["failure"]
    assert message is not None, "rank 0 returned normally although rank 1 never joined"
    assert "ring_attention on rank 0 of 2" in message and "another rank probably raised" in message, message
    assert seconds < 30, (seconds, message)  # the peer's exit is seen at once; the process group timeout (60 s) is not what fired
