"""agent (Agent Attention): the module against its equations written out, on sequences and grids (config grid
or per call), linear cost, config and call errors, older checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.agent import AgentAttention, naive_agent
from common import assert_loads_old_checkpoint, assert_same_forward_and_grads, build, fused_checkpoint, rand


def _projections(m, x):
    """x W_Q + b, x W_K + b, x W_V + b [B, N, H*D] from the module's weights."""
    return tuple(F.linear(x, p.weight, p.bias) for p in (m.q_proj, m.k_proj, m.v_proj))


def _agent_closed_form(m, x):
    """With as many agents as tokens, pooling is the identity (A = Q) and, without biases or convolution,
    Y = softmax(s Q Q^T) softmax(s Q K^T) V W_O + b_O: two rounds of softmax attention through the queries."""
    B, N, _ = x.shape
    H, D = m.config.heads, m.config.head_dim
    q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in _projections(m, x))  # (B, H, N, D)
    s = D ** -0.5
    o = torch.softmax(s * q @ q.transpose(-1, -2), -1) @ torch.softmax(s * q @ k.transpose(-1, -2), -1) @ v
    return o.transpose(1, 2).reshape(B, N, H * D) @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_agent_with_as_many_agents_as_tokens_is_the_closed_form(backend):
    m = build(f"agent(agents=20, agent_bias=False, dwc_kernel=None, backend={backend!r})", dim=24, heads=3)
    x = rand(2, 20, 24)
    torch.testing.assert_close(m(x), _agent_closed_form(m, x), rtol=1e-10, atol=1e-10)


def test_agent_on_a_grid_with_as_many_agents_as_tokens_is_the_closed_form():
    m = build("agent(ndim=2, agents=16, agent_bias=False, dwc_kernel=None)", dim=24, heads=3)
    x = rand(2, 16, 24)
    torch.testing.assert_close(m(x, grid=(4, 4)), _agent_closed_form(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ndim,N,grid,kw", [(1, 45, None, {}), (2, 35, (5, 7), {}), (1, 1, None, {"dwc_kernel": 5}),
                                            (2, 63, (7, 9), {"agent_bias": False}), (1, 30, None, {"dwc_kernel": None})],
                         ids=["sequence", "grid", "one-token", "grid-no-bias", "sequence-no-conv"])
def test_agent_matches_its_reference_forward_and_backward(ndim, N, grid, kw):
    """The full module against naive_agent, its equations written out: pooled agents, interpolated biases,
    depthwise conv, both softmax steps materialized."""
    m = build(f"agent(ndim={ndim}, agents=4, dwc_kernel=3, bias_resolution=3)", dim=16, heads=2, **kw)
    x = rand(2, N, 16, requires_grad=True)
    grads = assert_same_forward_and_grads(m(x, grid=grid), naive_agent(m, x, grid), [x, *m.parameters()], seed=1)
    if N > 1:  # every parameter takes part
        assert all(a.abs().sum() > 0 for a in grads[1:])


def test_config_grid_sets_ndim_and_the_call_may_override_it():
    m = build("agent(grid=(5, 7), agents=4, bias_resolution=3)", dim=16, heads=2)
    assert m.config.ndim == 2 and m.config.grid == (5, 7) and m.agent_bias.shape == (2, 4, 3, 3)
    per_call = build("agent(ndim=2, agents=4, bias_resolution=3)", dim=16, heads=2)
    per_call.load_state_dict(m.state_dict())
    x = rand(2, 35, 16)
    torch.testing.assert_close(m(x), per_call(x, grid=(5, 7)), rtol=0, atol=0)
    torch.testing.assert_close(m(x), naive_agent(m, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, grid=(7, 5)), per_call(x, grid=(7, 5)), rtol=0, atol=0)
    assert not torch.allclose(m(x), m(x, grid=(7, 5)))
    assert m.caps.grid == "optional"


def test_agent_attends_between_tokens_and_agents_only(monkeypatch):
    """Cost linear in N: each softmax step is one attention call between the N tokens and the n agents, never
    N x N."""
    import headwise.ops.agent.agent as agent_ops

    calls = []

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2]))
        return headwise.attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(agent_ops, "attention", recording)
    m = build("agent(agents=16)", dim=32, heads=2)
    assert m(rand(1, 500, 32)).shape == (1, 500, 32)
    assert calls == [(16, 500), (500, 16)]


def test_fused_qkv_checkpoint_loads():
    """Checkpoints from before the split projections (one ``qkv_proj``, rows [q; k; v]) load into q/k/v_proj."""
    m = build("agent(agents=4)", dim=16, heads=2)
    fresh = build("agent(agents=4)", seed=1, dim=16, heads=2)
    old = fused_checkpoint(m.state_dict(), ("q_proj", "k_proj", "v_proj"), "qkv_proj")
    assert_loads_old_checkpoint(fresh, old, m, rand(1, 11, 16))


@pytest.mark.parametrize("spec,match", [
    ("agent(ndim=3)", r"ndim must be 1 \(sequences\) or 2 \(grids\)"),
    ("agent(ndim=2, agents=10)", r"agents must be a perfect square"),
    ("agent(grid=(4, 4), agents=10)", r"agents must be a perfect square"),
    ("agent(ndim=1, grid=(4, 4))", r"grid is only for ndim=2 modules, got ndim=1 grid=\(4, 4\)"),
    ("agent(grid=(4, 4, 4))", r"grid must be a tuple of 2 positive ints"),
    ("agent(dwc_kernel=4)", r"dwc_kernel must be odd"),
    ("agent(backend='fast')", r"unknown backend='fast'"),
    ("agent(kv_heads=2)", r"kv_heads must equal heads, got kv_heads=2 heads=4"),
])
def test_bad_configs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, dim=32, heads=4)


def test_bad_calls():
    agent1, agent2 = build("agent(agents=4)", dim=16, heads=2), build("agent(ndim=2, agents=4)", dim=16, heads=2)
    x = rand(1, 12, 16)
    with pytest.raises(ValueError, match=r"grid=\(3, 5\) does not multiply to the number of tokens N=12"):
        agent2(x, grid=(3, 5))
    with pytest.raises(ValueError, match=r"needs grid=\(h, w\)"):
        agent2(x)
    with pytest.raises(ValueError, match=r"grid is only for ndim=2"):
        agent1(x, grid=(3, 4))
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] with C = dim = 16"):
        agent1(rand(1, 5, 8))


def test_registered_and_created():
    assert "agent" in headwise.available()
    m = headwise.create("agent(agents=9, ndim=2)", dim=64, heads=4)
    assert isinstance(m, AgentAttention) and m.config.agents == 9 and m.agent_bias.shape == (4, 9, 7, 7)
