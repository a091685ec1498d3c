"""The linear-attention modules: lightning (TransNormerLLM), linear (kernelized), agent; decoding by steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.linear import decay_rates, naive_linear_attention
from headwise.variants.linear import AgentAttention, LightningAttention, LinearAttention

F64 = torch.float64


def tokens(B, N, C, seed=0):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed), dtype=F64)


def build(spec, seed=0, **kw):
    torch.manual_seed(seed)
    return headwise.create(spec, **kw).double()


DECODERS = {
    "lightning-decay": ("lightning(layer=2, num_layers=6)", {}),
    "lightning-no-decay": ("lightning(decay=False)", {}),
    "lightning-head-dim-12": ("lightning(head_dim=12, block_size=8)", {}),
    "linear-elu": ("linear(causal=True)", {}),
    "linear-relu": ("linear(causal=True, feature_map='relu', block_size=16)", {}),
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("N,M", [(1, 5), (37, 9), (130, 3)], ids=lambda x: str(x))
def test_prefill_then_steps_equals_forward(name, N, M):
    spec, kw = DECODERS[name]
    m = build(spec, dim=32, heads=4, **kw)
    x = tokens(2, N + M, 32)
    full = m(x)
    y, state = m.prefill(x[:, :N])
    steps = [y]
    for t in range(N, N + M):
        y_t, state = m.step(x[:, t], state)
        steps.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["lightning-decay", "linear-elu"])
def test_steps_from_scratch_and_chunked_prefill(name):
    m = build(DECODERS[name][0], dim=32, heads=4)
    x = tokens(1, 40, 32, seed=1)
    full = m(x)
    state, outs = None, []
    for t in range(5):
        y_t, state = m.step(x[:, t], state)
        outs.append(y_t[:, None])
    y, state = m.prefill(x[:, 5:21], state)
    y2, state = m.prefill(x[:, 21:], state)
    torch.testing.assert_close(torch.cat(outs + [y, y2], dim=1), full, rtol=1e-10, atol=1e-10)


def test_lightning_equals_its_equations():
    """Y = (SRMSNorm([O_1..O_H]) * U) W_O, O_h = ((Q K^T) * M) V, Q = silu(X W_Q), K = silu(X W_K), V = X W_V."""
    m = build("lightning(layer=1, num_layers=4)", dim=24, heads=3)
    x = tokens(2, 50, 24)
    B, N, _ = x.shape
    w_q, w_k, w_v, w_u = m.qkvu_proj.weight.chunk(4)
    heads = lambda t: t.view(B, N, 3, 8).transpose(1, 2)  # (B, H, N, D)
    q, k, v = heads(F.silu(x @ w_q.T)), heads(F.silu(x @ w_k.T)), heads(x @ w_v.T)
    o, _ = naive_linear_attention(q, k, v, decay_rates(3, layer=1, num_layers=4))  # no scale, no normalizer
    o = o.transpose(1, 2).reshape(B, N, 24)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(m(x), (o * (x @ w_u.T)) @ m.out_proj.weight.T, rtol=1e-10, atol=1e-10)
    assert m.qkvu_proj.bias is None and m.out_proj.bias is None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu+1", "relu"])
def test_linear_equals_its_equations(causal, feature_map):
    """o_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps), j over all or j <= i."""
    m = build(f"linear(causal={causal}, feature_map={feature_map!r}, block_size=16)", dim=16, heads=2)
    x = tokens(2, 45, 16)
    B, N, _ = x.shape
    phi = (lambda t: F.elu(t) + 1) if feature_map == "elu+1" else F.relu
    q, k, v = (x @ m.qkv_proj.weight.T + m.qkv_proj.bias).chunk(3, dim=-1)
    heads = lambda t: t.view(B, N, 2, 8).transpose(1, 2)  # (B, H, N, D)
    q, k, v = heads(phi(q)), heads(phi(k)), heads(v)
    a = q @ k.transpose(-1, -2)  # (B, H, N, N)
    if causal:
        a = a.tril()
    o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    want = o.transpose(1, 2).reshape(B, N, 16) @ m.out_proj.weight.T + m.out_proj.bias
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)


def test_non_causal_linear_has_no_steps():
    m = build("linear", dim=16, heads=2)
    with pytest.raises(ValueError, match=r"step\(\) decodes token by token and needs causal=True"):
        m.step(tokens(1, 1, 16)[:, 0])
    with pytest.raises(ValueError, match=r"prefill\(\) .* needs causal=True"):
        m.prefill(tokens(1, 4, 16))


def _agent_closed_form(m, x):
    """With as many agents as tokens, pooling is the identity (A = Q) and, without biases or convolution,
    Y = softmax(s Q Q^T) softmax(s Q K^T) V W_O + b_O: two rounds of softmax attention through the queries."""
    B, N, _ = x.shape
    H, D = m.config.heads, m.config.head_dim
    q, k, v = (x @ m.qkv_proj.weight.T + m.qkv_proj.bias).chunk(3, dim=-1)
    q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    s = D ** -0.5
    o = torch.softmax(s * q @ q.transpose(-1, -2), -1) @ torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v
    return o.transpose(1, 2).reshape(B, N, H * D) @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_agent_with_as_many_agents_as_tokens_is_the_closed_form(backend):
    m = build(f"agent(agents=20, agent_bias=False, dwc_kernel=None, backend={backend!r})", dim=24, heads=3)
    x = tokens(2, 20, 24)
    torch.testing.assert_close(m(x), _agent_closed_form(m, x), rtol=1e-10, atol=1e-10)


def test_agent_on_a_grid_with_as_many_agents_as_tokens_is_the_closed_form():
    m = build("agent(ndim=2, agents=16, agent_bias=False, dwc_kernel=None)", dim=24, heads=3)
    x = tokens(2, 16, 24)
    torch.testing.assert_close(m(x, grid=(4, 4)), _agent_closed_form(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ndim,N,grid", [(1, 45, None), (2, 35, (5, 7))], ids=["sequence", "grid"])
def test_agent_biases_and_convolution(ndim, N, grid):
    """The full module against its equations written out: pooled agents, interpolated biases, depthwise conv."""
    m = build(f"agent(ndim={ndim}, agents=4, dwc_kernel=3, bias_resolution=3)", dim=16, heads=2)
    x = tokens(2, N, 16)
    B, H, D = 2, 2, 8
    spatial = (N,) if ndim == 1 else grid
    q, k, v = (x @ m.qkv_proj.weight.T + m.qkv_proj.bias).chunk(3, dim=-1)  # (B, N, H*D)
    grid_of = lambda t: t.transpose(1, 2).reshape(B, H * D, *spatial)  # (B, H*D, *spatial)
    if ndim == 1:
        agents = F.adaptive_avg_pool1d(grid_of(q), 4)  # (B, H*D, 4)
        b1 = F.interpolate(m.agent_bias, size=N, mode="linear")  # (H, 4, N)
        b2 = F.interpolate(m.query_bias, size=N, mode="linear").transpose(1, 2)  # (H, N, 4)
        conv = F.conv1d(grid_of(v), m.dwc.weight, m.dwc.bias, padding=1, groups=H * D)
    else:
        agents = F.adaptive_avg_pool2d(grid_of(q), (2, 2)).flatten(2)  # (B, H*D, 4)
        b1 = F.interpolate(m.agent_bias, size=grid, mode="bilinear").flatten(2)  # (H, 4, N)
        b2 = F.interpolate(m.query_bias, size=grid, mode="bilinear").flatten(2).transpose(1, 2)  # (H, N, 4)
        conv = F.conv2d(grid_of(v), m.dwc.weight, m.dwc.bias, padding=1, groups=H * D)
    heads = lambda t: t.reshape(B, -1, H, D).transpose(1, 2)  # (B, H, *, D)
    a, qh, kh, vh = heads(agents.transpose(1, 2)), heads(q), heads(k), heads(v)
    s = D ** -0.5
    agent_v = torch.softmax(s * a @ kh.transpose(-1, -2) + b1, -1) @ vh  # (B, H, 4, D)
    o = torch.softmax(s * qh @ a.transpose(-1, -2) + b2, -1) @ agent_v  # (B, H, N, D)
    o = o.transpose(1, 2).reshape(B, N, H * D) + conv.flatten(2).transpose(1, 2)
    want = o @ m.out_proj.weight.T + m.out_proj.bias
    got = m(x, grid=grid)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_agent_attends_between_tokens_and_agents_only(monkeypatch):
    """Cost linear in N: each softmax step is one attention call between the N tokens and the n agents, never
    N x N."""
    import headwise.linear.agent as agent_ops

    calls = []

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return headwise.attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(agent_ops, "attention", recording)
    m = build("agent(agents=16)", dim=32, heads=2)
    assert m(tokens(1, 500, 32)).shape == (1, 500, 32)
    assert calls == [(16, 500), (500, 16)]


@pytest.mark.parametrize("spec,match", [
    ("lightning(layer=4, num_layers=4)", r"0 <= layer < num_layers, got layer=4 num_layers=4"),
    ("lightning(block_size=0)", r"block_size must be a positive int, got block_size=0"),
    ("lightning(decay=1)", r"decay must be a bool"),
    ("linear(feature_map='softmax')", r"unknown feature_map='softmax'; valid: 'elu\+1', 'relu'"),
    ("linear(heads=5)", r"dim must be divisible by heads"),
    ("agent(ndim=3)", r"ndim must be 1 \(sequences\) or 2 \(grids\)"),
    ("agent(ndim=2, agents=10)", r"agents must be a perfect square"),
    ("agent(dwc_kernel=4)", r"dwc_kernel must be odd"),
    ("agent(backend='fast')", r"unknown backend='fast'"),
])
def test_bad_configs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, dim=32, heads=4)


def test_bad_calls():
    agent1, agent2 = build("agent(agents=4)", dim=16, heads=2), build("agent(ndim=2, agents=4)", dim=16, heads=2)
    x = tokens(1, 12, 16)
    with pytest.raises(ValueError, match=r"grid=\(3, 5\) does not multiply to the number of tokens N=12"):
        agent2(x, grid=(3, 5))
    with pytest.raises(ValueError, match=r"needs grid=\(h, w\)"):
        agent2(x)
    with pytest.raises(ValueError, match=r"grid is only for ndim=2"):
        agent1(x, grid=(3, 4))
    light = build("lightning", dim=16, heads=2)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] with C = dim = 16"):
        light(tokens(1, 5, 8))
    with pytest.raises(ValueError, match=r"x_t must be \[B, C\]"):
        light.step(x)


def test_registered_and_created():
    assert {"lightning", "linear", "agent"} <= set(headwise.available())
    assert isinstance(headwise.create("lightning", dim=64, heads=4), LightningAttention)
    assert isinstance(headwise.create("linear", dim=64, heads=4), LinearAttention)
    m = headwise.create("agent(agents=9, ndim=2)", dim=64, heads=4)
    assert isinstance(m, AgentAttention) and m.config.agents == 9 and m.agent_bias.shape == (4, 9, 7, 7)
    light = headwise.create("lightning(layer=0, num_layers=3)", dim=64, heads=4)
    torch.testing.assert_close(light.decay, decay_rates(4, layer=0, num_layers=3))
    assert headwise.create("lightning(decay=False)", dim=64, heads=4).decay is None
    assert math.isclose(light.scale, 1.0) and not light.normalize
