"""Agent Attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention")
(registered as ``"agent"``).

A few agent tokens pooled from the queries aggregate the keys and values by softmax attention and broadcast the
result back to every query (linear in ``N``), plus a depthwise convolution of the values. The functional core
is :mod:`headwise.ops.agent` (``agent_attention``, both softmax steps through :func:`headwise.attention`; the
reference ``naive_agent_attention``); this module owns the projections, the pooling, the bias tables and the
convolution. The module's reference is :func:`naive_agent`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_grid, check_positive_int, check_tokens
from headwise.ops.agent import agent_attention, naive_agent_attention
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend
from headwise.variants.registry import register

__all__ = ["AgentAttention", "naive_agent"]


@register("agent")
class AgentAttention(ProjectedAttention):
    r"""Agent Attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

    ``n`` agent tokens ``A``, pooled from the queries, aggregate the keys and values with softmax attention and
    broadcast the result back to every query; a depthwise convolution of ``V`` restores local diversity:

    .. math::

        A = \mathrm{Pool}(Q),\quad
        O = \sigma(s\,Q A^\top + B_2)\; \sigma(s\,A K^\top + B_1)\; V + \mathrm{DWC}(V),\quad
        Y = O W_O

    with ``sigma`` the row softmax, ``s = D^{-1/2}`` and learned agent biases ``B_1`` ``[H, n, N]`` and ``B_2``
    ``[H, N, n]``. Cost O(N n d): linear in ``N``. Both softmax steps run through :func:`headwise.attention`
    (:func:`headwise.ops.agent.agent_attention`).

    Inputs: a sequence (``ndim=1``): ``x`` ``[B, N, C]``, agents by 1-D adaptive average pooling of the queries,
    a 1-D depthwise convolution; or a grid (``ndim=2``): ``x`` ``[B, h*w, C]`` in row-major order on the config's
    ``grid=(h, w)`` (or ``forward(x, grid=(h, w))``, which overrides it for one call), agents by 2-D pooling to
    ``sqrt(n) x sqrt(n)`` (``n`` must be a square), a 2-D depthwise convolution. Non-causal (the agents summarize
    every query), so there is no step decoding.

    Fields (:class:`AgentAttention.Config`): those of :class:`~headwise.variants.base.ProjectedAttention`
    (``dim``, ``heads``, ``head_dim``, ``qkv_bias``, ``out_bias``, ``dropout``; ``kv_heads`` must equal ``heads``),
    and:

    * ``agents``: number of agent tokens ``n`` (default 49, the paper's 7 x 7).
    * ``grid``: the ``(h, w)`` token grid of a 2-D module (default None: sequences, or a grid given per call).
    * ``ndim``: 1 for sequences, 2 for image grids; None (default): 2 when ``grid`` is set, else 1.
    * ``dwc_kernel``: kernel of the depthwise convolution on ``V`` (odd; default 3, as in the paper); None: no
      convolution term.
    * ``agent_bias``: learn the agent biases (default True). ``bias_resolution``: side of the learned bias
      tables, interpolated to the input length or grid (default 7).
    * ``backend``: :func:`headwise.attention` backend of the two softmax steps (default ``"auto"``).

    Choices made here: each bias is one learned table ``[H, n, r]`` (sequences) or ``[H, n, r, r]`` (grids),
    linearly / bilinearly interpolated to the input, as the paper's block bias; the row and column biases of the
    official code, which tie a layer to one window size, are left out, so a module runs on any length or grid.
    ``ndim`` stays a field: it fixes the parameter shapes (1-D or 2-D convolution and bias tables), and a 2-D
    module may leave ``grid`` to each call; with ``grid`` set it follows from it.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("agent(grid=(14, 14))", dim=64, heads=4)          # ndim=2 from the grid
        >>> m(torch.randn(2, 14 * 14, 64)).shape
        torch.Size([2, 196, 64])
        >>> m(torch.randn(2, 7 * 28, 64), grid=(7, 28)).shape                      # another grid, same weights
        torch.Size([2, 196, 64])
    """

    fused_qkv_init = True  # initialised as the former qkv_proj (same weights for a given seed)
    capabilities = Capabilities(grid="optional")
    example_config = {"dim": 16, "heads": 2, "agents": 4, "grid": (3, 5), "bias_resolution": 3}

    @dataclass
    class Config(ProjectedAttention.Config):
        agents: int = 49  # number of agent tokens n (a perfect square when ndim=2)
        grid: tuple[int, int] | None = None  # (h, w) token grid of x [B, h*w, C], row-major; None: per call or 1-D
        ndim: int | None = None  # 1: sequences [B, N, C]; 2: grids [B, h*w, C]; None: 2 if grid is set, else 1
        dwc_kernel: int | None = 3  # depthwise convolution kernel on V (odd); None: no convolution term
        agent_bias: bool = True  # learned agent biases B_1, B_2 on the two softmax steps
        bias_resolution: int = 7  # side of the learned bias tables, interpolated to the input
        backend: str = "auto"  # headwise.attention backend of the two softmax steps

        def __post_init__(self):
            super().__post_init__()
            if self.kv_heads != self.heads:
                raise ValueError(f"agent attention has one key/value head per query head: kv_heads must equal "
                                 f"heads, got kv_heads={self.kv_heads} heads={self.heads}")
            check_positive_int("agents", self.agents)
            if self.grid is not None:
                self.grid = check_grid("grid", self.grid, 2)
            if self.ndim is None:
                self.ndim = 1 if self.grid is None else 2
            check_positive_int("ndim", self.ndim)
            if self.ndim not in (1, 2):
                raise ValueError(f"ndim must be 1 (sequences) or 2 (grids), got ndim={self.ndim}")
            if self.ndim == 1 and self.grid is not None:
                raise ValueError(f"grid is only for ndim=2 modules, got ndim=1 grid={self.grid}")
            if self.ndim == 2 and math.isqrt(self.agents) ** 2 != self.agents:
                raise ValueError(f"agents must be a perfect square for 2-D grids (pooled to a square), got "
                                 f"agents={self.agents}")
            if self.dwc_kernel is not None:
                check_positive_int("dwc_kernel", self.dwc_kernel)
                if self.dwc_kernel % 2 == 0:
                    raise ValueError(f"dwc_kernel must be odd (same-size output), got dwc_kernel={self.dwc_kernel}")
            check_bool("agent_bias", self.agent_bias)
            check_positive_int("bias_resolution", self.bias_resolution)
            check_backend(self.backend)

    def build(self, cfg) -> None:
        super().build(cfg)
        inner = cfg.heads * cfg.head_dim
        conv = nn.Conv1d if cfg.ndim == 1 else nn.Conv2d
        self.dwc = None if cfg.dwc_kernel is None else conv(inner, inner, cfg.dwc_kernel, padding=cfg.dwc_kernel // 2,
                                                            groups=inner)
        if cfg.agent_bias:
            table = (cfg.heads, cfg.agents) + (cfg.bias_resolution,) * cfg.ndim
            self.agent_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(table), std=0.02))  # B_1: agent -> key
            self.query_bias = nn.Parameter(nn.init.trunc_normal_(torch.empty(table), std=0.02))  # B_2: query -> agent
        else:
            self.agent_bias = self.query_bias = None

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """``[B, N, C] -> [B, N, C]``; ``grid=(h, w)`` with ``h * w = N`` overrides the config's grid (2-D only)."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
        B, N, _ = x.shape
        spatial = self._spatial(grid, N)  # (N,) or (h, w)
        n = cfg.agents
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # 3 x (B, N, H*D)
        pool = F.adaptive_avg_pool1d if cfg.ndim == 1 else F.adaptive_avg_pool2d
        pooled_to = n if cfg.ndim == 1 else (math.isqrt(n),) * 2
        agents = pool(q.transpose(1, 2).reshape(B, -1, *spatial), pooled_to).flatten(2).transpose(1, 2)  # (B, n, H*D)
        agent_bias = query_bias = None
        if self.agent_bias is not None:
            mode = "linear" if cfg.ndim == 1 else "bilinear"
            resize = lambda table: F.interpolate(table, size=spatial, mode=mode, align_corners=False).flatten(2)
            agent_bias = resize(self.agent_bias)  # (H, n, N)
            query_bias = resize(self.query_bias).transpose(1, 2)  # (H, N, n)
        o = agent_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v), self.split_heads(agents),
                            agent_bias=agent_bias, query_bias=query_bias, backend=cfg.backend)  # (B, H, N, D)
        o = o.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*D)
        if self.dwc is not None:
            o = o + self.dwc(v.transpose(1, 2).reshape(B, -1, *spatial)).flatten(2).transpose(1, 2)  # (B, N, H*D)
        return self.dropout(self.out_proj(o))  # (B, N, C)

    def _spatial(self, grid, N: int) -> tuple[int, ...]:
        """The call's token layout: ``(N,)`` for sequences, ``(h, w)`` (the call's grid, else the config's)."""
        if self.config.ndim == 1:
            if grid is not None:
                raise ValueError(f"grid is only for ndim=2 modules; this one takes sequences (ndim=1), got {grid=}")
            return (N,)
        grid = self.config.grid if grid is None else check_grid("grid", grid, 2)
        if grid is None:
            raise ValueError("an ndim=2 module needs grid=(h, w) with h * w = N, in its config or in the call")
        if grid[0] * grid[1] != N:
            raise ValueError(f"{grid=} does not multiply to the number of tokens {N=}")
        return grid


def naive_agent(m: AgentAttention, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
    """The reference of :class:`AgentAttention`, its equations written out with the module's own weights:
    ``F.linear`` projections, agents by adaptive average pooling of the queries on the token layout, the bias
    tables interpolated to it, both softmax steps materialized (:func:`~headwise.ops.agent.naive_agent_attention`),
    the depthwise convolution of ``V`` (``F.conv1d`` / ``F.conv2d``), output projection.

    ``x`` ``[B, N, C]``; ``grid`` as in ``forward`` (the config's when None, for a 2-D module) -> ``[B, N, C]``;
    the output dropout is not applied (compare in ``eval()`` mode).
    """
    cfg = m.config
    B, N, _ = x.shape
    H, D, n = cfg.heads, cfg.head_dim, cfg.agents
    spatial = (N,) if cfg.ndim == 1 else tuple(grid or cfg.grid)
    q, k, v = (F.linear(x, p.weight, p.bias) for p in (m.q_proj, m.k_proj, m.v_proj))  # (B, N, H*D)
    as_map = lambda t: t.transpose(1, 2).reshape(B, H * D, *spatial)  # (B, H*D, *spatial)
    if cfg.ndim == 1:
        agents = F.adaptive_avg_pool1d(as_map(q), n)  # (B, H*D, n)
    else:
        agents = F.adaptive_avg_pool2d(as_map(q), (math.isqrt(n),) * 2).flatten(2)  # (B, H*D, n)
    b1 = b2 = None
    if m.agent_bias is not None:
        mode = "linear" if cfg.ndim == 1 else "bilinear"
        b1 = F.interpolate(m.agent_bias, size=spatial, mode=mode).flatten(2)  # (H, n, N)
        b2 = F.interpolate(m.query_bias, size=spatial, mode=mode).flatten(2).transpose(1, 2)  # (H, N, n)
    heads = lambda t: t.reshape(B, -1, H, D).transpose(1, 2)  # (B, H, *, D)
    o = naive_agent_attention(heads(q), heads(k), heads(v), heads(agents.transpose(1, 2)), agent_bias=b1,
                              query_bias=b2)  # (B, H, N, D)
    o = o.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    if m.dwc is not None:
        conv = F.conv1d if cfg.ndim == 1 else F.conv2d
        o = o + conv(as_map(v), m.dwc.weight, m.dwc.bias, padding=cfg.dwc_kernel // 2,
                     groups=H * D).flatten(2).transpose(1, 2)  # (B, N, H*D)
    return F.linear(o, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
