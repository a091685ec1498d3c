"""ShardLayout: positions, padding and zigzag balance (no process group needed)."""

import pytest
import torch

from headwise.distributed.sharding import ShardLayout


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("n,world", [(1, 2), (37, 2), (37, 4), (64, 4), (8, 4), (5, 4)], ids=lambda v: str(v))
def test_positions_partition_the_padded_sequence(n, world, layout):
    lay = ShardLayout(n, world, layout)
    assert lay.padded_len >= n and lay.padded_len % world == 0
    assert lay.padded_len - n < lay.n_chunks  # less than one token of padding per chunk
    assert sorted(lay.order.tolist()) == list(range(lay.padded_len))
    assert torch.equal(lay.order[lay.inverse], torch.arange(lay.padded_len))
    for r in range(world):
        pos = lay.positions(r)
        assert pos.numel() == lay.local_len
        real = sum(ql for _, ql, _ in lay.chunks(r))
        assert real == int((pos < n).sum())
        for start, ql, off in lay.chunks(r):  # the real tokens of a chunk come first, in order
            assert pos[off: off + ql].tolist() == list(range(start, start + ql))


def test_zigzag_balances_causal_pairs():
    n, world = 64, 4
    lay = ShardLayout(n, world, "zigzag")
    pairs = [int((lay.positions(r) + 1).sum()) for r in range(world)]  # query i sees i + 1 keys
    assert len(set(pairs)) == 1
    contiguous = ShardLayout(n, world, "contiguous")
    assert len({int((contiguous.positions(r) + 1).sum()) for r in range(world)}) == world


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=0, world=2), "seq_len"),
    (dict(seq_len=4, world=0), "world"),
    (dict(seq_len=4, world=2, layout="striped"), "layout"),
], ids=["seq_len0", "world0", "layout"])
def test_bad_layout_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        ShardLayout(**kw)


def test_without_process_group_raises_clearly():
    from headwise.distributed import shard_sequence

    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_sequence(torch.zeros(1, 1, 4, 2))
