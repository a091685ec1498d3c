"""Linear-complexity attention modules: ``lightning`` (TransNormerLLM), ``linear`` (kernelized), ``agent``.

``lightning`` and ``linear`` (causal) decode token by token: ``prefill(x) -> (y, state)`` over a prompt, then
``step(x_t, state) -> (y_t, state)`` per new token, equal to ``forward`` over the whole sequence. The functional
ops they call live in :mod:`headwise.linear`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.core.attention import BACKENDS
from headwise.linear import agent_attention, chunk_linear_attention, decay_rates, recurrent_linear_attention
from headwise.linear.base import apply_normalizer, with_normalizer
from headwise.checks import check_bool, check_positive_int, resolve_head_dim
from headwise.variants.registry import register

__all__ = ["LightningAttention", "LinearAttention", "AgentAttention"]








def _check_tokens(name: str, x: Tensor, dim: int, ndim: int = 3) -> None:
    shape = "[B, N, C]" if ndim == 3 else "[B, C]"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[-1] != dim or min(x.shape) < 1:
        raise ValueError(f"{name} must be {shape} with C = dim = {dim}, got {name}.shape={tuple(x.shape)}")


class _RecurrentMixer(nn.Module):
    """Shared plumbing of the causal linear-attention modules: forward, prefill and step over one recurrence.

    A subclass provides ``_project(x) -> (q, k, v, gate)`` (q, k, v ``[B, H, N, *]``, ``gate`` whatever
    ``_finish`` needs) and ``_finish(o, gate) -> y`` (``o`` ``[B, H, N, Dv]``), and sets ``decay``, ``scale``,
    ``normalize`` and ``block_size``.
    """

    decay: Tensor | None
    scale: float
    normalize: bool
    block_size: int

    def _op_kwargs(self) -> dict:
        return dict(scale=self.scale, normalize=self.normalize)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C] -> [B, N, C]``, the chunked (Lightning Attention-2) op over the whole sequence."""
        return self.prefill(x)[0]

    def prefill(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run over ``x`` ``[B, N, C]`` (continuing from ``state``, or from zeros); returns ``(y, state)``."""
        _check_tokens("x", x, self.config.dim)
        q, k, v, gate = self._project(x)
        o, state = chunk_linear_attention(q, k, v, self.decay, initial_state=state, output_final_state=True,
                                          block_size=self.block_size, **self._op_kwargs())  # (B, H, N, Dv)
        return self._finish(o, gate), state

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token ``x_t`` ``[B, C]`` through the recurrence from ``state`` (zeros when None): ``(y_t, state)``.

        ``state`` is ``[B, H, D, Dv]`` (``Dv + 1`` with a normalizer), as returned by :meth:`prefill` or a
        previous step.
        """
        _check_tokens("x_t", x_t, self.config.dim, ndim=2)
        q, k, v, gate = self._project(x_t[:, None])  # (B, H, 1, *)
        o, state = recurrent_linear_attention(q, k, v, self.decay, initial_state=state, output_final_state=True,
                                              **self._op_kwargs())  # (B, H, 1, Dv)
        return self._finish(o, gate)[:, 0], state

    def _heads(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.config.heads, -1).transpose(1, 2)  # (B, H, N, D)

    @staticmethod
    def _merge_heads(o: Tensor) -> Tensor:
        B, H, N, Dv = o.shape
        return o.transpose(1, 2).reshape(B, N, H * Dv)  # (B, N, H*Dv)


@register("lightning")
class LightningAttention(_RecurrentMixer):
    r"""The TransNormerLLM token mixer: gated linear attention with decay, computed by Lightning Attention-2.

    From "TransNormerLLM" / "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
    Attention" (Qin et al., 2024) and "Lightning Attention-2" (Qin et al., 2024). Per layer:

    .. math::

        Q = \phi(X W_Q),\ K = \phi(X W_K),\ V = X W_V,\ U = X W_U \qquad (\phi = \mathrm{SiLU})

        O_h = \big((Q_h K_h^\top) \odot M_h\big) V_h, \qquad M_{h,ij} = \lambda_h^{\,i-j}\ (i \ge j),\ 0\ (i < j)

        Y = \big(\mathrm{SRMSNorm}([O_1, \dots, O_H]) \odot U\big) W_O, \qquad
        \mathrm{SRMSNorm}(x) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}

    with ``lambda_h`` from :func:`headwise.linear.decay_rates` (ALiBi slopes scaled by depth
    ``1 - layer / (num_layers - 1)``), no ``1/sqrt(d)`` scale and no denominator (the norm replaces it).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, ``[B, H, N, D]``. Causal. Decoding: :meth:`prefill` over
    a prompt, then :meth:`step` per token; the state is ``[B, H, D, D]``.

    Args:
        dim: model width ``C``. heads: ``H``. head_dim: ``D``, default ``dim // heads``.
        layer, num_layers: position of this layer in the stack (sets the decay; default a single layer).
        decay: use the per-head decay (default True); False is plain causal linear attention (lambda = 1).
        block_size: Lightning Attention-2 block (default 64).
        bias: biases in the projections (default False, as in TransNormerLLM).

    Choices made here (following the official TransNormerLLM code where the paper is silent): ``W_Q, W_K, W_V,
    W_U`` are one fused projection; the gate ``U`` has no activation; SRMSNorm runs over all ``H D`` channels
    with ``eps = 1e-6`` and no weight. The optional LRPE positional encoding of the paper is not included.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("lightning(layer=3, num_layers=12)", dim=512, heads=8)
        >>> x = torch.randn(2, 1000, 512)
        >>> y = m(x)                                             # [2, 1000, 512]
        >>> y_prompt, state = m.prefill(x[:, :990])
        >>> y_next, state = m.step(x[:, 990], state)             # == y[:, 990]
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D; None: dim // heads
        layer: int = 0  # index of this layer in the stack, 0 <= layer < num_layers (sets the decay)
        num_layers: int = 1  # layers in the stack; the decay weakens with depth
        decay: bool = True  # per-head decay lambda_h (False: lambda = 1, no decay)
        block_size: int = 64  # tokens per Lightning Attention-2 block
        bias: bool = False  # biases in the input and output projections

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            check_positive_int("num_layers", self.num_layers)
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < self.num_layers:
                raise ValueError(f"layer must be an int with 0 <= layer < num_layers, got layer={self.layer!r} "
                                 f"num_layers={self.num_layers}")
            check_positive_int("block_size", self.block_size)
            check_bool("decay", self.decay)
            check_bool("bias", self.bias)

    norm_eps = 1e-6

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, layer: int = 0, num_layers: int = 1,
                 decay: bool = True, block_size: int = 64, bias: bool = False):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, head_dim=head_dim, layer=layer, num_layers=num_layers,
                                        decay=decay, block_size=block_size, bias=bias)
        inner = cfg.heads * cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.dim, 4 * inner, bias=cfg.bias)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=cfg.bias)
        # a constant (float64, not a parameter or buffer: .half() must not round it)
        self.decay = decay_rates(cfg.heads, layer=cfg.layer, num_layers=cfg.num_layers) if cfg.decay else None
        self.scale, self.normalize, self.block_size = 1.0, False, cfg.block_size

    def _project(self, x: Tensor):
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)  # 4 x (B, N, H*D)
        q, k, v = (self._heads(t) for t in (F.silu(q), F.silu(k), v))  # (B, H, N, D)
        return q, k, v, u

    def _finish(self, o: Tensor, u: Tensor) -> Tensor:
        o = self._merge_heads(o)  # (B, N, H*D)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)  # SRMSNorm
        return self.out_proj(o * u)  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, layer={c.layer}, num_layers={c.num_layers}, "
                f"decay={c.decay}, block_size={c.block_size}")


_FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


@register("linear")
class LinearAttention(_RecurrentMixer):
    r"""Kernelized linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    .. math::

        o_i = \frac{\phi(q_i)^\top \sum_j \phi(k_j) v_j^\top}{\phi(q_i)^\top \sum_j \phi(k_j) + \epsilon}

    over all ``j`` (non-causal) or ``j <= i`` (causal, computed by :func:`headwise.linear.chunk_linear_attention`
    with ``normalize=True``), with the feature map ``phi`` = ``elu(x) + 1`` (the paper's) or ``relu``, and
    ``eps = 1e-6``. O(N D^2) time.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, ``[B, H, N, D]``. With ``causal=True`` the module decodes
    (:meth:`prefill`, :meth:`step`) with a state ``[B, H, D, D + 1]`` (the last column is the normalizer
    ``sum_j phi(k_j)``); a non-causal module has no recurrence and raises there.

    Args:
        dim: model width ``C``. heads: ``H``. head_dim: ``D``, default ``dim // heads``.
        feature_map: ``"elu+1"`` (default) or ``"relu"``.
        causal: causal (autoregressive) or full attention (default False).
        block_size: block of the chunked causal op (default 64).
        qkv_bias, out_bias: projection biases (default True).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("linear(causal=True)", dim=256, heads=4)
        >>> y = m(torch.randn(2, 300, 256))                       # [2, 300, 256]
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D; None: dim // heads
        feature_map: str = "elu+1"  # phi applied to queries and keys: "elu+1" or "relu"
        causal: bool = False  # causal (each token sees itself and the past) or full attention
        block_size: int = 64  # tokens per block of the chunked causal op
        qkv_bias: bool = True  # bias in the q, k, v projection
        out_bias: bool = True  # bias in the output projection

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            if self.feature_map not in _FEATURE_MAPS:
                raise ValueError(f"unknown feature_map={self.feature_map!r}; valid: {', '.join(map(repr, _FEATURE_MAPS))}")
            check_bool("causal", self.causal)
            check_positive_int("block_size", self.block_size)
            check_bool("qkv_bias", self.qkv_bias)
            check_bool("out_bias", self.out_bias)

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, feature_map: str = "elu+1",
                 causal: bool = False, block_size: int = 64, qkv_bias: bool = True, out_bias: bool = True):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, head_dim=head_dim, feature_map=feature_map,
                                        causal=causal, block_size=block_size, qkv_bias=qkv_bias, out_bias=out_bias)
        inner = cfg.heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, 3 * inner, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=cfg.out_bias)
        self.phi = _FEATURE_MAPS[cfg.feature_map]
        self.decay, self.scale, self.normalize, self.block_size = None, 1.0, True, cfg.block_size

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C] -> [B, N, C]``."""
        if self.config.causal:
            return super().forward(x)
        _check_tokens("x", x, self.config.dim)
        q, k, v, _ = self._project(x)
        kv = k.transpose(-1, -2) @ with_normalizer(v)  # (B, H, D, Dv + 1): [sum_j phi(k_j) v_j^T, sum_j phi(k_j)]
        return self._finish(apply_normalizer(q @ kv), None)  # (B, N, C)

    def prefill(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal modules only: ``x`` ``[B, N, C]`` from ``state`` -> ``(y, state)`` (``[B, H, D, D + 1]``)."""
        self._require_causal("prefill")
        return super().prefill(x, state)

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal modules only: one token ``x_t`` ``[B, C]`` from ``state`` -> ``(y_t, state)``."""
        self._require_causal("step")
        return super().step(x_t, state)

    def _require_causal(self, what: str) -> None:
        if not self.config.causal:
            raise ValueError(f"{what}() decodes token by token and needs causal=True; this module has causal=False")

    def _project(self, x: Tensor):
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # 3 x (B, N, H*D)
        return self._heads(self.phi(q)), self._heads(self.phi(k)), self._heads(v), None  # (B, H, N, D)

    def _finish(self, o: Tensor, _) -> Tensor:
        return self.out_proj(self._merge_heads(o))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, feature_map={c.feature_map!r}, causal={c.causal}"


@register("agent")
class AgentAttention(nn.Module):
    r"""Agent Attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

    ``n`` agent tokens ``A``, pooled from the queries, aggregate the keys and values with softmax attention and
    broadcast the result back to every query; a depthwise convolution of ``V`` restores local diversity:

    .. math::

        A = \mathrm{Pool}(Q),\quad
        O = \sigma(s\,Q A^\top + B_2)\; \sigma(s\,A K^\top + B_1)\; V + \mathrm{DWC}(V),\quad
        Y = O W_O

    with ``sigma`` the row softmax, ``s = D^{-1/2}`` and learned agent biases ``B_1`` ``[H, n, N]`` and ``B_2``
    ``[H, N, n]``. Cost O(N n d): linear in ``N``. Both softmax steps run through :func:`headwise.attention`
    (:func:`headwise.linear.agent_attention`).

    Inputs: a sequence (``ndim=1``): ``x`` ``[B, N, C]``, agents by 1-D adaptive average pooling of the queries,
    a 1-D depthwise convolution; or a grid (``ndim=2``): ``x`` ``[B, h*w, C]`` in row-major order with
    ``forward(x, grid=(h, w))``, agents by 2-D pooling to ``sqrt(n) x sqrt(n)`` (``n`` must be a square), a
    2-D depthwise convolution. Non-causal (the agents summarize every query), so there is no step decoding.

    Args:
        dim: model width ``C``. heads: ``H``. head_dim: ``D``, default ``dim // heads``.
        agents: number of agent tokens ``n`` (default 49, the paper's 7 x 7).
        ndim: 1 for sequences, 2 for image grids (default 1).
        dwc_kernel: kernel of the depthwise convolution on ``V`` (odd; default 3, as in the paper); None: no
            convolution term.
        agent_bias: learn the agent biases (default True).
        bias_resolution: side of the learned bias tables, interpolated to the input length or grid (default 7).
        qkv_bias: bias in the q, k, v projection (default True).
        backend: :func:`headwise.attention` backend of the two softmax steps (default ``"auto"``).

    Choices made here: each bias is one learned table ``[H, n, r]`` (sequences) or ``[H, n, r, r]`` (grids),
    linearly / bilinearly interpolated to the input, as the paper's block bias; the row and column biases of the
    official code, which tie a layer to one window size, are left out, so a module runs on any length or grid.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("agent(ndim=2)", dim=256, heads=4)
        >>> y = m(torch.randn(2, 56 * 56, 256), grid=(56, 56))      # [2, 3136, 256]
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D; None: dim // heads
        agents: int = 49  # number of agent tokens n (a perfect square when ndim=2)
        ndim: int = 1  # 1: sequences [B, N, C]; 2: grids [B, h*w, C] with forward(x, grid=(h, w))
        dwc_kernel: int | None = 3  # depthwise convolution kernel on V (odd); None: no convolution term
        agent_bias: bool = True  # learned agent biases B_1, B_2 on the two softmax steps
        bias_resolution: int = 7  # side of the learned bias tables, interpolated to the input
        qkv_bias: bool = True  # bias in the q, k, v projection
        backend: str = "auto"  # headwise.attention backend of the two softmax steps

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            check_positive_int("agents", self.agents)
            check_positive_int("ndim", self.ndim)
            if self.ndim not in (1, 2):
                raise ValueError(f"ndim must be 1 (sequences) or 2 (grids), got ndim={self.ndim}")
            if self.ndim == 2 and math.isqrt(self.agents) ** 2 != self.agents:
                raise ValueError(f"agents must be a perfect square for 2-D grids (pooled to a square), got "
                                 f"agents={self.agents}")
            if self.dwc_kernel is not None:
                check_positive_int("dwc_kernel", self.dwc_kernel)
                if self.dwc_kernel % 2 == 0:
                    raise ValueError(f"dwc_kernel must be odd (same-size output), got dwc_kernel={self.dwc_kernel}")
            check_bool("agent_bias", self.agent_bias)
            check_positive_int("bias_resolution", self.bias_resolution)
            check_bool("qkv_bias", self.qkv_bias)
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, agents: int = 49, ndim: int = 1,
                 dwc_kernel: int | None = 3, agent_bias: bool = True, bias_resolution: int = 7,
                 qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, head_dim=head_dim, agents=agents, ndim=ndim,
                                        dwc_kernel=dwc_kernel, agent_bias=agent_bias,
                                        bias_resolution=bias_resolution, qkv_bias=qkv_bias, backend=backend)
        inner = cfg.heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, 3 * inner, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(inner, cfg.dim)
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
        """``[B, N, C] -> [B, N, C]``; ``grid=(h, w)`` with ``h * w = N`` is required for ``ndim=2`` (row-major)."""
        cfg = self.config
        _check_tokens("x", x, cfg.dim)
        B, N, _ = x.shape
        spatial = self._spatial(grid, N)  # (N,) or (h, w)
        H, n = cfg.heads, cfg.agents
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # 3 x (B, N, H*D)
        pool = F.adaptive_avg_pool1d if cfg.ndim == 1 else F.adaptive_avg_pool2d
        pooled_to = n if cfg.ndim == 1 else (math.isqrt(n),) * 2
        agents = pool(q.transpose(1, 2).reshape(B, -1, *spatial), pooled_to).flatten(2).transpose(1, 2)  # (B, n, H*D)
        heads = lambda t: t.reshape(B, t.shape[1], H, -1).transpose(1, 2)  # (B, H, *, D)
        agent_bias = query_bias = None
        if self.agent_bias is not None:
            mode = "linear" if cfg.ndim == 1 else "bilinear"
            resize = lambda table: F.interpolate(table, size=spatial, mode=mode, align_corners=False).flatten(2)
            agent_bias = resize(self.agent_bias)  # (H, n, N)
            query_bias = resize(self.query_bias).transpose(1, 2)  # (H, N, n)
        o = agent_attention(heads(q), heads(k), heads(v), heads(agents), agent_bias=agent_bias,
                            query_bias=query_bias, backend=cfg.backend)  # (B, H, N, D)
        o = o.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*D)
        if self.dwc is not None:
            o = o + self.dwc(v.transpose(1, 2).reshape(B, -1, *spatial)).flatten(2).transpose(1, 2)  # (B, N, H*D)
        return self.out_proj(o)  # (B, N, C)

    def _spatial(self, grid, N: int) -> tuple[int, ...]:
        if self.config.ndim == 1:
            if grid is not None:
                raise ValueError(f"grid is only for ndim=2 modules; this one takes sequences (ndim=1), got {grid=}")
            return (N,)
        if grid is None:
            raise ValueError("an ndim=2 module needs grid=(h, w) with h * w = N")
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
            raise ValueError(f"grid must be two positive ints (h, w), got {grid=!r}")
        if grid[0] * grid[1] != N:
            raise ValueError(f"{grid=} does not multiply to the number of tokens {N=}")
        return tuple(grid)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, agents={c.agents}, ndim={c.ndim}, "
                f"dwc_kernel={c.dwc_kernel}, agent_bias={c.agent_bias}")
