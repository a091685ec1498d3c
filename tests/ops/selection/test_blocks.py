"""Block selections (MoBA, VMoBA, HiP) against plain-Python brute force on small inputs."""

import math

import pytest
import torch

from headwise.ops.selection import (
    VMOBA_PARTITIONS, block_means, blocks_from_token_selection, hip_select, moba_select, vmoba_layer_partition,
    vmoba_partition, vmoba_select,
)


def _qk(B, H, N, D, H_kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv or H, N, D, generator=g, dtype=torch.float64)
    return q, k


def _gates(q, k, block):
    """Brute-force gates [B][H][N][C] as Python floats: q_i . (mean of block c's keys)."""
    B, H, N, D = q.shape
    groups = H // k.shape[1]
    C = math.ceil(N / block)
    out = []
    for b in range(B):
        out.append([])
        for h in range(H):
            kh = k[b, h // groups]
            means = [kh[c * block:min(N, (c + 1) * block)].mean(0) for c in range(C)]
            out[b].append([[float(q[b, h, i] @ means[c]) for c in range(C)] for i in range(N)])
    return out


def _as_tensor(sets, B, H, N, C):
    t = torch.zeros(B, H, N, C, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                for c in sets[b][h][i]:
                    t[b, h, i, c] = True
    return t


# ---- MoBA ---------------------------------------------------------------------------------------------
def brute_moba(q, k, block, topk, causal):
    B, H, N, _ = q.shape
    C = math.ceil(N / block)
    g = _gates(q, k, block)
    sets = [[[None] * N for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for i in range(N):
                own = i // block
                cands = [c for c in range(C) if (c < own if causal else c != own)]
                ranked = sorted(cands, key=lambda c: (-g[b][h][i][c], c))  # ties: lower block first
                sets[b][h][i] = {own, *ranked[:topk - 1]}
    return _as_tensor(sets, B, H, N, C)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,H,H_kv,N,block,topk", [
    (1, 1, 1, 1, 4, 1), (2, 2, 1, 37, 5, 3), (1, 4, 2, 63, 8, 4), (1, 2, 2, 50, 7, 20),
], ids=["N1", "B2-H2-gqa-N37", "H4-gqa-N63", "topk-over-blocks"])
def test_moba_matches_brute_force(B, H, H_kv, N, block, topk, causal):
    q, k = _qk(B, H, N, 6, H_kv)
    assert torch.equal(moba_select(q, k, block=block, topk=topk, causal=causal), brute_moba(q, k, block, topk, causal))


def test_moba_ties_pick_the_lower_block():
    q = torch.ones(1, 1, 16, 2, dtype=torch.float64)
    k = torch.ones(1, 1, 16, 2, dtype=torch.float64)  # every gate equal
    sel = moba_select(q, k, block=4, topk=2)
    assert sel[0, 0, 15].nonzero().flatten().tolist() == [0, 3]  # own block 3 + the lowest past block


def test_moba_topk_at_least_blocks_is_every_causal_block():
    q, k = _qk(1, 2, 30, 4)
    sel = moba_select(q, k, block=4, topk=8)
    own = torch.arange(30) // 4
    assert torch.equal(sel, (torch.arange(8)[None, :] <= own[:, None]).expand_as(sel))


def test_block_means_partial_last_block():
    k = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    assert block_means(k, 4).flatten().tolist() == [1.5, 5.5, 8.5]


# ---- VMoBA --------------------------------------------------------------------------------------------
def brute_vmoba(q, k, block, selection, scope, tau, topk):
    B, H, N, _ = q.shape
    C = math.ceil(N / block)
    g = _gates(q, k, block)
    sets = [[[set() for _ in range(N)] for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            groups = [[(i, c) for i in range(N) for c in range(C)]] if scope == "head" else \
                [[(i, c) for c in range(C)] for i in range(N)]
            for pairs in groups:
                own = [(i, c) for i, c in pairs if c == i // block]
                rest = [(i, c) for i, c in pairs if c != i // block]
                chosen = set(own)
                if selection == "topk":
                    ranked = sorted(rest, key=lambda p: (-g[b][h][p[0]][p[1]], p[0] * C + p[1]))
                    budget = topk * N if scope == "head" else topk
                    chosen |= set(ranked[:max(0, budget - len(own))])
                else:
                    vals = [g[b][h][i][c] for i, c in pairs]
                    lo, hi = min(vals), max(vals)
                    den = hi - lo if hi - lo > 1e-6 else 1.0
                    norm = {p: (g[b][h][p[0]][p[1]] - lo) / den for p in pairs}
                    total = sum(norm.values())
                    need = max(0.0, tau - sum(norm[p] for p in own) / (total + 1e-6))
                    ranked = sorted(pairs, key=lambda p: (-(0.0 if p in chosen else norm[p]), p[0] * C + p[1]))
                    mass = 0.0
                    for p in ranked:  # add until the mass reaches `need`, that pair included
                        chosen.add(p)
                        mass += 0.0 if p in own else norm[p]
                        if mass / (total + 1e-6) >= need:
                            break
                for i, c in chosen:
                    sets[b][h][i].add(c)
    return _as_tensor(sets, B, H, N, C)


@pytest.mark.parametrize("scope", ["head", "query"])
@pytest.mark.parametrize("selection,tau,topk", [("threshold", 0.25, 0), ("threshold", 0.6, 0), ("threshold", 0.0, 0),
                                               ("topk", 0, 2), ("topk", 0, 9)],
                         ids=["tau0.25", "tau0.6", "tau0", "topk2", "topk9"])
@pytest.mark.parametrize("N,block", [(1, 3), (40, 8), (45, 6)], ids=["N1", "N40-b8", "N45-b6-partial"])
def test_vmoba_matches_brute_force(N, block, selection, tau, topk, scope):
    q, k = _qk(2, 2, N, 5, 1, seed=N)
    got = vmoba_select(q, k, block=block, selection=selection, scope=scope, tau=tau, topk=topk or 3)
    assert torch.equal(got, brute_vmoba(q, k, block, selection, scope, tau, topk or 3))


def test_vmoba_threshold_always_adds_a_block_beyond_the_own():
    q, k = _qk(1, 1, 32, 4)
    sel = vmoba_select(q, k, block=8, selection="threshold", scope="query", tau=0.0)
    assert (sel.sum(-1) == 2).all()  # tau 0: own block + exactly one more, per query
    full = vmoba_select(q, k, block=8, selection="threshold", scope="query", tau=1.0)
    assert full.all()


def test_vmoba_partitions_are_blocks_of_the_grid():
    grid = (4, 6, 8)
    perm, size = vmoba_partition(grid, "1d", 2)
    assert torch.equal(perm, torch.arange(192)) and size == 96
    perm, size = vmoba_partition(grid, "2d", (3, 4))
    t, y, x = perm // 48, perm // 8 % 6, perm % 8
    assert size == 48 and torch.equal(torch.sort(perm).values, torch.arange(192))
    for c in range(4):  # each block: one 3 x 4 patch through all frames
        blk = slice(c * 48, (c + 1) * 48)
        assert set(t[blk].tolist()) == {0, 1, 2, 3}
        assert len(set((y[blk] // 3).tolist())) == 1 and len(set((x[blk] // 4).tolist())) == 1
    perm, size = vmoba_partition(grid, "3d", (2, 3, 4))
    t, y, x = perm // 48, perm // 8 % 6, perm % 8
    assert size == 24
    for c in range(8):
        blk = slice(c * 24, (c + 1) * 24)
        cubes = {(a // 2, b // 3, d // 4) for a, b, d in zip(t[blk].tolist(), y[blk].tolist(), x[blk].tolist())}
        assert len(cubes) == 1
    assert [vmoba_layer_partition(l) for l in range(5)] == ["1d", "2d", "3d", "1d", "2d"] == \
        [VMOBA_PARTITIONS[l % 3] for l in range(5)]


@pytest.mark.parametrize("partition,block,match", [
    ("2d", (4, 4), "must divide"), ("3d", (3, 3), "tuple of 3"), ("1d", 5, "exceeds"), ("4d", 1, "partition"),
])
def test_vmoba_partition_bad_blocks_raise(partition, block, match):
    with pytest.raises(ValueError, match=match):
        vmoba_partition((4, 6, 8), partition, block)


# ---- HiP ----------------------------------------------------------------------------------------------
def brute_hip(q, k, block, topk, window, causal):
    """The tree search with Python lists, one query block at a time."""
    B, H, N, D = q.shape
    groups = H // k.shape[1]
    n = math.ceil(N / block)
    out = torch.full((B, H, n, window + topk), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            kh = k[b, h // groups]
            for qb in range(n):
                lo_w = max(0, qb - window + 1) if causal else max(0, qb - (window - 1) // 2)
                hi_w = qb if causal else min(n - 1, qb + window // 2)
                win = list(range(lo_w, hi_w + 1))
                cands = [c for c in range(n) if c not in win and (c < qb or not causal)]
                C = len(cands)
                rows = q[b, h, qb * block:min(N, (qb + 1) * block)]
                if C <= topk:
                    found = cands
                else:
                    nodes = [(j * C // topk, (j + 1) * C // topk) for j in range(topk)]
                    while any(hi - lo > 1 for lo, hi in nodes):
                        children = []
                        for lo, hi in nodes:
                            if hi - lo > 1:
                                mid = lo + (hi - lo + 1) // 2
                                children += [(lo, mid), (mid, hi)]
                            else:
                                children.append((lo, hi))
                        scored = []
                        for lo, hi in children:
                            centre = (lo + hi) * block // 2
                            tok = min(N - 1, cands[centre // block] * block + centre % block)
                            scored.append((-float((rows @ kh[tok]).max()), lo, (lo, hi)))
                        nodes = sorted(node for _, _, node in sorted(scored)[:topk])
                    found = [cands[lo] for lo, _ in nodes]
                out[b, h, qb, :len(win)] = torch.tensor(win)
                out[b, h, qb, window:window + len(found)] = torch.tensor(found, dtype=torch.long)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,H,H_kv,N,block,topk,window", [
    (1, 1, 1, 1, 4, 2, 1), (1, 2, 1, 63, 4, 3, 2), (2, 2, 2, 100, 3, 5, 3), (1, 1, 1, 97, 2, 4, 1),
    (1, 2, 2, 40, 4, 20, 2),
], ids=["N1", "gqa-N63", "B2-N100", "deep-tree", "topk-over-blocks"])
def test_hip_matches_brute_force(B, H, H_kv, N, block, topk, window, causal):
    q, k = _qk(B, H, N, 4, H_kv, seed=N + topk)
    got = hip_select(q, k, block=block, topk=topk, window=window, causal=causal)
    assert torch.equal(got, brute_hip(q, k, block, topk, window, causal))


def test_hip_finds_a_planted_block():
    q, k = _qk(1, 1, 256, 8)
    q, k = q * 0.01, k * 0.01
    k[0, 0, 40:44] = q[0, 0, 250] * 1000  # key block 10 (block 4) matches the last query block strongly
    got = hip_select(q, k, block=4, topk=2, window=1)
    assert 10 in got[0, 0, -1].tolist()


def test_hip_topk_covering_everything_selects_all_blocks():
    q, k = _qk(1, 2, 50, 4)
    got = hip_select(q, k, block=8, topk=7, window=1)  # 7 blocks: window 1 + up to 6 candidates
    for qb in range(7):
        assert sorted(c for c in got[0, 0, qb].tolist() if c >= 0) == list(range(qb + 1))


# ---- the engine's form and bad input -----------------------------------------------------------------
def test_blocks_from_token_selection_round_trip():
    g = torch.Generator().manual_seed(3)
    sel = torch.rand(2, 3, 29, 6, generator=g) < 0.3
    kv_blocks, row_mask = blocks_from_token_selection(sel, 8)
    back = torch.zeros_like(sel)
    for b, h, qb, s in (kv_blocks >= 0).nonzero().tolist():
        rows = row_mask[b, h, qb, s].nonzero().flatten() + qb * 8
        back[b, h, rows[rows < 29], kv_blocks[b, h, qb, s]] = True
    assert torch.equal(back, sel)
    union = torch.nn.functional.pad(sel, (0, 0, 0, 3)).view(2, 3, 4, 8, 6).any(3)  # (B, H, nQB, nKB)
    assert kv_blocks.shape[-1] == int(union.sum(-1).max())


@pytest.mark.parametrize("call,match", [
    (lambda q, k: moba_select(q, k, block=0, topk=2), "block"),
    (lambda q, k: moba_select(q, k, block=4, topk=0), "topk"),
    (lambda q, k: moba_select(q, k[:, :, :5], block=4, topk=2), "k must be"),
    (lambda q, k: vmoba_select(q, k, block=4, tau=1.5), "tau"),
    (lambda q, k: vmoba_select(q, k, block=4, selection="best"), "selection"),
    (lambda q, k: vmoba_select(q, k, block=4, scope="layer"), "scope"),
    (lambda q, k: hip_select(q, k, block=4, topk=2, window=0), "window"),
    (lambda q, k: hip_select(q, k, block=4, topk=-1), "topk"),
], ids=["moba-block", "moba-topk", "moba-length", "vmoba-tau", "vmoba-selection", "vmoba-scope", "hip-window",
        "hip-topk"])
def test_bad_arguments_raise(call, match):
    q, k = _qk(1, 2, 16, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k)
