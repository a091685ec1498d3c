"""moba, vmoba, hip modules: output and gradients vs dense masked attention over the same selection (float64)."""

import pytest
import torch

import headwise
from headwise.core.reference import masked_attention
from headwise.selection import hip_select, moba_select, vmoba_partition, vmoba_select
from headwise.variants.mixture_of_blocks import hip_attention, moba_attention, vmoba_attention

TOL = dict(rtol=1e-10, atol=1e-10)


def _module(spec, dim=16, heads=2, **kw):
    torch.manual_seed(0)
    return headwise.create(spec, dim=dim, heads=heads, **kw).double()


def _tokens(B, N, C, seed=1):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dense_mask(m, q, k):
    """The token mask [B, H, N, N] the module's configuration means, built from the selection functions."""
    c = m.config
    N = q.shape[2]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    name = type(m).registry_name
    if name == "moba":
        sel = moba_select(q, k, block=c.block, topk=c.topk, causal=c.causal)  # (B, H, N, nKB)
        mask = sel.gather(-1, (j // c.block).expand(*sel.shape[:3], N))  # query i, key j: block j // block chosen
        return mask & (j <= i) if c.causal else mask
    if name == "hip":
        kv = hip_select(q, k, block=c.block, topk=c.topk, window=c.window, causal=c.causal)  # (B, H, nQB, S)
        rows = kv[:, :, torch.arange(N) // c.block]  # (B, H, N, S)
        mask = (rows[..., None, :] == (torch.arange(N) // c.block)[:, None]).any(-1)  # (B, H, N, N)
        return mask & (j <= i) if c.causal else mask
    perm, size = vmoba_partition(c.grid, c.partition, c.block)
    sel = vmoba_select(q[:, :, perm], k[:, :, perm], block=size, selection=c.selection, scope=c.scope, tau=c.tau,
                       topk=c.topk)  # (B, H, N, nKB) in block order
    pos = torch.argsort(perm)  # grid token -> its place in block order
    sel = sel[:, :, pos]  # (B, H, N, nKB) in grid order
    return sel.gather(-1, (pos // size).expand(*sel.shape[:3], N))  # key j lies in block pos[j] // size


def _reference(m, x):
    q, k, v = m.project(x)
    with torch.no_grad():
        mask = _dense_mask(m, q, k)
    out, _ = masked_attention(q, k, v, mask)  # (B, H, N, D)
    B, N, _ = x.shape
    return m.mha.out_proj(out.transpose(1, 2).reshape(B, N, -1))


def _grads(m, x, fn):
    x = x.clone().requires_grad_()
    m.zero_grad()
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


CASES = [
    ("moba(block=8, topk=3)", 1, 63, {}),
    ("moba(block=8, topk=3)", 2, 1, {}),
    ("moba(block=32, topk=4)", 1, 500, {"kv_heads": 1}),
    ("moba(block=7, topk=2, causal=False)", 2, 63, {}),
    ("hip(block=4, topk=3, window=2)", 2, 63, {}),
    ("hip(block=16, topk=5, window=1)", 1, 500, {"kv_heads": 1}),
    ("hip(block=8, topk=2, window=3, causal=False)", 1, 63, {}),
    ("hip(block=4, topk=2)", 1, 1, {}),
    ("vmoba(grid=(3, 3, 7), partition='1d', block_1d=1)", 2, 63, {}),
    ("vmoba(grid=(5, 10, 10), layer=1, block_2d=(5, 5), tau=0.5)", 1, 500, {"kv_heads": 1}),
    ("vmoba(grid=(4, 5, 25), layer=2, block_3d=(2, 5, 5), selection='topk', topk=3)", 1, 500, {}),
    ("vmoba(grid=(3, 3, 7), partition='1d', scope='query', tau=0.1)", 1, 63, {}),
    ("vmoba(grid=(1, 1, 1))", 1, 1, {}),
]


@pytest.mark.parametrize("spec,B,N,kw", CASES,
                         ids=[f"{s.split('(')[0]}-{i}-B{b}-N{n}" for i, (s, b, n, _) in enumerate(CASES)])
def test_module_matches_dense_reference(spec, B, N, kw):
    m = _module(spec, **kw)
    x = _tokens(B, N, 16)
    out, dx, dp = _grads(m, x, m)
    ref, dx_ref, dp_ref = _grads(m, x, lambda t: _reference(m, t))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    for name in dp:
        torch.testing.assert_close(dp[name], dp_ref[name], **TOL, msg=name)


@pytest.mark.parametrize("spec,causal", [
    ("moba(block=8, topk=8)", True),  # topk >= blocks: every earlier block
    ("moba(block=16, topk=100, causal=False)", False),
    ("hip(block=8, topk=4, window=4)", True),  # window + topk >= blocks
    ("vmoba(grid=(4, 4, 4), tau=1.0)", False),  # the whole mass
    ("vmoba(grid=(4, 4, 4), selection='topk', scope='query', topk=4)", False),
], ids=["moba-topk-all", "moba-full", "hip-all", "vmoba-tau1", "vmoba-topk-all"])
def test_degenerate_settings_are_full_attention(spec, causal):
    m = _module(spec, kv_heads=1)
    mha = _module("mha", kv_heads=1, pattern=headwise.patterns.Causal() if causal else None)
    mha.load_state_dict(m.mha.state_dict())  # the same projections
    x = _tokens(2, 64, 16)
    torch.testing.assert_close(m(x), mha(x), **TOL)


def test_functional_cores_match_their_reference_backend():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for fn, kw in ((moba_attention, dict(block=16, topk=2)), (hip_attention, dict(block=8, topk=3)),
                   (vmoba_attention, dict(grid=(4, 4, 6), partition="2d", block=(2, 3)))):
        fast, selection = fn(q, k, v, return_selection=True, **kw)
        torch.testing.assert_close(fast, fn(q, k, v, backend="reference", **kw), **TOL)
        assert selection.dtype == torch.bool if fn is not hip_attention else selection[0].dtype == torch.long


def test_float32_runs_and_selection_is_not_differentiated():
    m = headwise.create("moba(block=16, topk=2)", dim=32, heads=4)
    x = torch.randn(2, 100, 32, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("spec,kw,match", [
    ("moba", {"block": 0}, "block"),
    ("moba", {"topk": 0}, "topk"),
    ("moba", {"causal": "yes"}, "causal"),
    ("moba", {"backend": "sdpa"}, "backend"),
    ("moba", {"heads": 3}, "divisible"),
    ("hip", {"window": 0}, "window"),
    ("hip", {"topk": 1.5}, "topk"),
    ("vmoba", {}, "grid"),
    ("vmoba", {"grid": (4, 6, 6), "partition": "2d", "block_2d": (4, 4)}, "must divide"),
    ("vmoba", {"grid": (4, 8, 8), "partition": "4d"}, "partition"),
    ("vmoba", {"grid": (4, 8, 8), "tau": 2}, "tau"),
    ("vmoba", {"grid": (4, 8, 8), "layer": -1}, "layer"),
    ("vmoba", {"grid": (4, 8, 8), "scope": "layer"}, "scope"),
], ids=["moba-block", "moba-topk", "moba-causal", "moba-backend", "moba-heads", "hip-window", "hip-topk",
        "vmoba-no-grid", "vmoba-block", "vmoba-partition", "vmoba-tau", "vmoba-layer", "vmoba-scope"])
def test_bad_configs_raise_naming_the_argument(spec, kw, match):
    args = {"dim": 16, "heads": 2, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, **args)


def test_vmoba_input_must_match_the_grid():
    m = headwise.create("vmoba(grid=(2, 4, 4), block_1d=1)", dim=16, heads=2)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 31, 16))


def test_vmoba_layers_cycle_through_the_partitions():
    parts = [headwise.create(f"vmoba(grid=(4, 8, 8), layer={layer})", dim=16, heads=2).config.partition
             for layer in range(6)]
    assert parts == ["1d", "2d", "3d"] * 2
    m = headwise.create("vmoba(grid=(4, 8, 8), layer=1, partition='3d', block_3d=(2, 4, 4))", dim=16, heads=2)
    assert m.config.partition == "3d" and m.config.block == (2, 4, 4)
