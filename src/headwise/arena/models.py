"""Arena models whose attention is any registered variant: a decoder-only LM, a ViT-style encoder, and the
one-layer in-context regression transformer.

Every layer's token mixer is a registry spec (``"mha"``, ``"moba(block=16, topk=2)"``; one spec for all layers or
one per layer). Registered variants are heterogeneous (some take ``grid``, some have no causal mode, some return
tuples, some read ``[B, C, H, W]`` feature maps), so ONE adapter, :func:`plan_mixer`, decides from the registry
how to call a variant as a ``[B, N, C] -> [B, N, C]`` mixer, or why it cannot serve a model:

* **config fields** (:func:`headwise.variants.registry.config_fields`): ``dim``, ``heads``, ``grid`` (the patch grid
  of an image model; a variant that *requires* a grid cannot serve a 1-D sequence task), ``tokens`` (the sequence
  length, for token-MLP mixers), ``ndim`` (2 on a grid, else 1), ``layer`` / ``num_layers`` (the layer index and
  depth). Causal models set ``causal=True`` where the config has ``causal``, else intersect the ``pattern`` field
  with :class:`headwise.patterns.Causal`; a variant with neither must turn out causal in the probe below.
  Any other config field without a default must be given in the spec.
* **forward signature**: ``grid=`` is passed when the forward takes it and the model has a grid; a forward that
  needs another argument (a second input) cannot serve.
* **one probe call** (float64, eval mode, random input at the model's shape, global RNG untouched): ``[B, N, C]``
  tokens first, then -- on a grid only -- a ``[B, C, h, w]`` feature map (the ``image`` family: LKA, ULSAM, ...);
  a tuple output contributes its first element; the output must have the input's shape; for a causal model,
  changing the inputs from position ``t`` on must leave the outputs before ``t`` unchanged (a mixer that peeks
  ahead -- a non-causal convolution inside, a token MLP -- is refused with that reason).

:func:`plan_mixer` raises :class:`Unsupported` (a ``ValueError``) with the reason; the arena writes it in the
leaderboard row. New registry entries are picked up without code changes.

Builders: :func:`build_lm`, :func:`build_vit`, :func:`build_regression`. Every module keeps its mixers'
``aux_loss`` (MoH-style router losses) reachable through :func:`aux_loss`.

>>> lm = build_lm("mha", vocab=256, dim=64, depth=2, heads=4, max_len=64)     # tokens [B, N] -> logits [B, N, V]
>>> vit = build_vit("lka", image_size=28, patch=4, classes=10)                  # images [B, 1, 28, 28] -> [B, 10]
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import headwise
from headwise import patterns
from headwise.tables import first_line
from headwise.spec import parse_spec
from headwise.checks import check_positive_int
from headwise.variants.registry import get

__all__ = ["Unsupported", "MixerPlan", "plan_mixer", "plan_layers", "Mixer", "Block", "LanguageModel", "ImageEncoder",
           "RegressionTransformer", "build_lm", "build_vit", "build_regression", "split_specs", "aux_loss",
           "count_params"]

class Unsupported(ValueError):
    """A variant cannot serve a model (the message says why); the arena reports it instead of crashing."""


@dataclass(frozen=True)
class MixerPlan:
    """How to build and call one registered variant as a ``[B, N, C] -> [B, N, C]`` mixer."""

    spec: str  # the variant spec as given
    name: str  # its registry name
    kwargs: dict = field(default_factory=dict)  # keywords for headwise.create; they win over the spec's (causal pattern)
    layer_keys: tuple = ()  # config fields that get the layer index / depth: subset of ("layer", "num_layers")
    layout: str = "tokens"  # "tokens": x [B, N, C]; "image": feature map [B, C, h, w] on the grid
    grid: tuple | None = None  # (h, w) passed to forward(x, grid=...) or used to reshape for "image"
    grid_arg: bool = False  # the forward takes grid=
    causal: bool = False  # the mixer was made and verified causal
    note: str = ""  # how causality was obtained ("config causal=True", "pattern & Causal()", "probe")

    def create(self, layer: int = 0, depth: int = 1) -> nn.Module:
        extra = {k: v for k, v in (("layer", layer), ("num_layers", depth)) if k in self.layer_keys}
        name, spec_kwargs = parse_spec(self.spec)
        return headwise.create(name, **{**spec_kwargs, **self.kwargs, **extra})


def split_specs(text: str) -> list[str]:
    """Split ``"mha(heads=1),moba(block=16, topk=2)"`` on the commas outside parentheses; each part must parse
    as a spec (:func:`headwise.spec.parse_spec`)."""
    if not isinstance(text, str):
        raise TypeError(f"specs must be a string, got {type(text).__name__}: {text!r}")
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    specs = [p.strip() for p in parts if p.strip()]
    if not specs:
        raise ValueError(f"no spec in {text=}")
    for s in specs:
        parse_spec(s)  # raises ValueError naming a malformed one
    return specs


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _call(module: nn.Module, x: Tensor, plan: MixerPlan) -> Tensor:
    """Apply ``module`` to tokens ``x`` ``[B, N, C]`` as ``plan`` says; ``[B, N, C]`` out."""
    B, N, C = x.shape
    if plan.layout == "image":
        h, w = plan.grid
        x = x.transpose(1, 2).reshape(B, C, h, w).contiguous()  # (B, C, h, w)
    out = module(x, grid=plan.grid) if plan.grid_arg else module(x)
    y = _first_tensor(out)
    if y is None:
        raise Unsupported(f"{plan.spec} returns {type(out).__name__}, not a tensor or a tuple starting with one")
    if plan.layout == "image":
        y = y.flatten(2).transpose(1, 2)  # (B, N, C)
    return y


def _required_forward_args(cls) -> list[str]:
    params = list(inspect.signature(cls.forward).parameters.values())[2:]  # past self and x
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def plan_mixer(spec: str, *, dim: int, heads: int, seq_len: int, causal: bool = False,
               grid: tuple[int, int] | None = None, defaults: dict | None = None, probe_batch: int = 2) -> MixerPlan:
    """Decide how ``spec`` serves as a mixer of width ``dim`` with ``heads`` heads on ``seq_len`` tokens
    (``causal``: autoregressive model; ``grid``: ``(h, w)`` patch grid with ``h * w = seq_len``), verified by one
    probe call (module docstring). ``defaults``: further config keywords for the variants whose config has them
    (the spec's own keywords win). Raises :class:`Unsupported` naming the reason."""
    check_positive_int("dim", dim)
    check_positive_int("heads", heads)
    check_positive_int("seq_len", seq_len)
    if grid is not None:
        grid = tuple(grid)
        if len(grid) != 2 or grid[0] * grid[1] != seq_len:
            raise ValueError(f"{grid=} does not multiply to {seq_len=}")
    name, spec_kwargs = parse_spec(spec)
    cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs: dict[str, Any] = {}
    filled = (("dim", dim), ("heads", heads), ("tokens", seq_len), ("ndim", 2 if grid else 1),
              *(defaults or {}).items())
    for key, value in filled:
        if key in fields and key not in spec_kwargs:
            kwargs[key] = value
    if "grid" in fields and "grid" not in spec_kwargs:
        f = fields["grid"]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if grid is not None:
            kwargs["grid"] = grid
        elif required:
            raise Unsupported(f"{name} needs a 2-D token grid (config field `grid`); this task's inputs are 1-D "
                              f"sequences")
    note = ""
    if causal:
        if "causal" in fields:
            if spec_kwargs.get("causal") is False:
                raise Unsupported(f"the spec sets causal=False but this task trains a causal model")
            kwargs["causal"] = True
            note = "causal=True"
        elif "pattern" in fields:
            given = spec_kwargs.get("pattern")
            given = patterns.from_spec(given) if isinstance(given, str) else given
            kwargs["pattern"] = patterns.Causal() if given is None else given & patterns.Causal()
            note = "pattern & Causal()"
        else:
            note = "causal by the probe"
    layer_keys = tuple(k for k in ("layer", "num_layers") if k in fields and k not in spec_kwargs)
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and k not in kwargs and k not in spec_kwargs
               and k not in layer_keys]
    if missing:
        raise Unsupported(f"{name}: config field(s) {missing} have no default; give them in the spec, e.g. "
                          f"{name}({missing[0]}=...)")
    extra_args = _required_forward_args(cls)
    if extra_args:
        raise Unsupported(f"{name}.forward needs {extra_args} besides x: not a self-attention mixer")
    grid_arg = grid is not None and "grid" in inspect.signature(cls.forward).parameters
    plan = MixerPlan(spec, name, kwargs, layer_keys, "tokens", grid, grid_arg, causal, note)
    return _probe(plan, dim=dim, seq_len=seq_len, batch=probe_batch)


def _probe(plan: MixerPlan, *, dim: int, seq_len: int, batch: int) -> MixerPlan:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            module = plan.create().eval()
        except (ValueError, TypeError, RuntimeError, AssertionError) as e:
            raise Unsupported(f"cannot build {plan.spec} at dim={dim}: {first_line(e)}") from None
        try:
            module = module.double()
            dtype = torch.float64
        except (RuntimeError, TypeError):
            dtype = torch.float32
        x = torch.randn(batch, seq_len, dim, dtype=dtype)  # (B, N, C)
        layouts = ["tokens"] + (["image"] if plan.grid is not None else [])
        errors = []
        for layout in layouts:
            trial = dataclasses.replace(plan, layout=layout)
            try:
                with torch.no_grad():
                    y = _call(module, x, trial)
            except Unsupported:
                raise
            except Exception as e:  # a variant's own check of its input is what tells the layouts apart
                errors.append(f"{layout}: {first_line(e)}")
                continue
            if y.shape != x.shape:
                errors.append(f"{layout}: output {tuple(y.shape)} is not the input's {tuple(x.shape)}")
                continue
            if plan.causal:
                _check_causal(module, x, y, trial)
            return trial
        raise Unsupported(f"{plan.spec} cannot run as a [B, N, C] mixer here ({'; '.join(errors)})")


def _check_causal(module: nn.Module, x: Tensor, y: Tensor, plan: MixerPlan) -> None:
    N = x.shape[1]
    tol = 1e-9 if x.dtype == torch.float64 else 1e-4
    for t in sorted({1, N // 2, N - 1} - {0}):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:])
        with torch.no_grad():
            y2 = _call(module, x2, plan)
        err = (y2[:, :t] - y[:, :t]).abs().max().item()
        if not err <= tol * max(1.0, y.abs().max().item()):
            how = (" (config has neither `causal` nor `pattern`)" if plan.note == "causal by the probe"
                   else f" even with {plan.note}")
            raise Unsupported(f"{plan.name} is not causal{how}: outputs before position {t} change when later "
                              f"tokens change (max {err:.2g})")


def plan_layers(specs: str | Sequence[str], depth: int, **kw) -> list[MixerPlan]:
    """One :class:`MixerPlan` per layer from one spec (every layer) or ``depth`` specs; ``kw`` as in
    :func:`plan_mixer` (each distinct spec is probed once)."""
    if isinstance(specs, str):
        specs = [specs] * depth
    specs = list(specs)
    if len(specs) != depth:
        raise ValueError(f"got {len(specs)} mixer specs for depth={depth}; give one spec or one per layer")
    cache: dict[str, MixerPlan] = {}
    for s in specs:
        if s not in cache:
            cache[s] = plan_mixer(s, **kw)
    return [cache[s] for s in specs]


# ---- modules -----------------------------------------------------------------------------------------------


class Mixer(nn.Module):
    """A registered variant called through its :class:`MixerPlan`: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, plan: MixerPlan, layer: int = 0, depth: int = 1):
        super().__init__()
        self.plan = plan
        self.inner = plan.create(layer, depth)

    def forward(self, x: Tensor) -> Tensor:
        return _call(self.inner, x, self.plan)

    def extra_repr(self) -> str:
        return f"spec={self.plan.spec!r}, layout={self.plan.layout!r}" + (", causal" if self.plan.causal else "")


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over tokens (Zoology's short convolution before the mixer):
    ``y_i = sum_{j<kernel} w_j x_{i-j}``, ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=kernel_size - 1)

    def forward(self, x: Tensor) -> Tensor:
        N = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :N].transpose(1, 2)  # (B, N, C)


class Block(nn.Module):
    """Pre-norm block: ``x + mixer(conv(norm(x)))`` then ``x + mlp(norm(x))`` (MLP optional, GELU, 4x)."""

    def __init__(self, plan: MixerPlan, dim: int, *, layer: int = 0, depth: int = 1, mlp: bool = True,
                 conv: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv = ShortConv(dim, conv) if conv else None
        self.mixer = Mixer(plan, layer, depth)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) \
            if mlp else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)  # (B, N, C)
        if self.conv is not None:
            h = self.conv(h)
        x = x + self.mixer(h)
        if self.mlp is not None:
            x = x + self.mlp(x)
        return x


def _sinusoid(n: int, dim: int) -> Tensor:
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


class LanguageModel(nn.Module):
    """Decoder-only LM: token (+ position) embedding, ``depth`` pre-norm blocks, final norm, tied-free head.

    ``tokens [B, N]`` int64 -> logits ``[B, N, vocab]``. ``positions``: ``"learned"`` (a table of ``max_len``),
    ``"sinusoidal"`` (fixed, any length) or ``"none"`` (the mixer and short conv carry order).
    """

    def __init__(self, plans: Sequence[MixerPlan], *, vocab: int, dim: int, max_len: int, mlp: bool = True,
                 conv: int = 0, positions: str = "learned"):
        super().__init__()
        if positions not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"positions must be 'learned', 'sinusoidal' or 'none', got {positions=!r}")
        self.max_len, self.positions = max_len, positions
        self.embed = nn.Embedding(vocab, dim)
        if positions == "learned":
            self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(p, dim, layer=i, depth=len(plans), mlp=mlp, conv=conv)
                                    for i, p in enumerate(plans))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        B, N = tokens.shape
        x = self.embed(tokens)  # (B, N, C)
        if self.positions == "learned":
            if N > self.max_len:
                raise ValueError(f"sequence of {N=} tokens exceeds the learned positions' {self.max_len=}")
            x = x + self.pos[:N]
        elif self.positions == "sinusoidal":
            x = x + _sinusoid(N, x.shape[-1]).to(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, N, V)


class ImageEncoder(nn.Module):
    """ViT-style classifier: 4x4 (``patch``) patch embedding onto a ``(h, w)`` grid, learned positions, pre-norm
    blocks, final norm, mean over patches (no class token, so grid variants see exactly ``h * w`` tokens),
    linear head. Mixers of the ``image`` family get the ``[B, C, h, w]`` feature map of the same tokens.
    ``images [B, channels, H, W]`` -> logits ``[B, classes]``."""

    def __init__(self, plans: Sequence[MixerPlan], *, image_size: int, patch: int, channels: int, classes: int,
                 dim: int, mlp: bool = True):
        super().__init__()
        self.grid = (image_size // patch, image_size // patch)
        self.patch = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(p, dim, layer=i, depth=len(plans), mlp=mlp) for i, p in enumerate(plans))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))  # (B, classes)


class RegressionTransformer(nn.Module):
    """The one-layer multi-head attention model of in-context linear regression (He et al., "In-Context Linear
    Regression Demystified", 2025): tokens ``z_i = (x_i, y_i)`` in ``R^{d+1}``, the query ``z_q = (x_q, 0)`` last;
    one attention layer, no embedding, norm, MLP or residual; the prediction is the last coordinate (the ``y``
    slot) of the attention output at the query token.

    Choices made here: tokens are zero-padded from ``d + 1`` to ``dim`` (default ``8``, so 1, 2, 4 and 8 heads
    divide it; the padding carries nothing); variants with a ``head_dim`` field get full-width heads,
    ``head_dim = dim``, as the paper's per-head ``(d+1) x (d+1)`` KQ matrices; others use their default. The
    query is also a key (its ``y`` is zero); since only the query row is read and there is one layer, full,
    causal and "query attends to the context" attention give the same prediction up to that key.
    ``tokens [B, n+1, d+1]`` -> prediction ``[B]``.
    """

    def __init__(self, plan: MixerPlan, *, d: int, dim: int):
        super().__init__()
        self.d, self.dim = d, dim
        self.mixer = Mixer(plan)

    def forward(self, tokens: Tensor) -> Tensor:
        x = F.pad(tokens, (0, self.dim - tokens.shape[-1]))  # (B, n+1, dim)
        return self.mixer(x)[:, -1, self.d]  # (B,)


def build_lm(specs: str | Sequence[str], *, vocab: int, dim: int = 64, depth: int = 2, heads: int = 4,
             max_len: int = 64, mlp: bool = True, conv: int = 0, positions: str = "learned") -> LanguageModel:
    """Decoder-only LM with the given mixer spec(s) made causal (raises :class:`Unsupported` if one cannot be).
    ``conv``: kernel of the short causal depthwise convolution before each mixer (Zoology; 0: none)."""
    for key, value in (("vocab", vocab), ("dim", dim), ("depth", depth), ("max_len", max_len)):
        check_positive_int(key, value)
    plans = plan_layers(specs, depth, dim=dim, heads=heads, seq_len=max_len, causal=True)
    return LanguageModel(plans, vocab=vocab, dim=dim, max_len=max_len, mlp=mlp, conv=conv, positions=positions)


def build_vit(specs: str | Sequence[str], *, image_size: int = 28, patch: int = 4, channels: int = 1,
              classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4, mlp: bool = True) -> ImageEncoder:
    """ViT-style image classifier over the ``(image_size // patch)^2`` patch grid (passed to grid variants)."""
    for key, value in (("image_size", image_size), ("patch", patch), ("channels", channels), ("classes", classes),
                       ("dim", dim), ("depth", depth)):
        check_positive_int(key, value)
    if image_size % patch:
        raise ValueError(f"{patch=} does not divide {image_size=}")
    side = image_size // patch
    plans = plan_layers(specs, depth, dim=dim, heads=heads, seq_len=side * side, grid=(side, side))
    return ImageEncoder(plans, image_size=image_size, patch=patch, channels=channels, classes=classes, dim=dim,
                        mlp=mlp)


def build_regression(spec: str, *, d: int = 5, heads: int = 4, num_context: int = 40,
                     dim: int = 8) -> RegressionTransformer:
    """The one-layer in-context regression transformer (:class:`RegressionTransformer`) with ``heads`` heads."""
    check_positive_int("d", d)
    check_positive_int("dim", dim)
    if dim < d + 1:
        raise ValueError(f"{dim=} must hold the d + 1 = {d + 1} token coordinates")
    plan = plan_mixer(spec, dim=dim, heads=heads, seq_len=num_context + 1, defaults={"head_dim": dim})
    return RegressionTransformer(plan, d=d, dim=dim)


def aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the ``aux_loss`` tensors that mixers left on themselves in the last forward (MoH routers), or
    None."""
    total = None
    for m in model.modules():
        value = getattr(m, "aux_loss", None)
        if isinstance(value, Tensor) and value.requires_grad:
            total = value if total is None else total + value
    return total


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
