"""Arena models whose attention is any registered variant: a decoder-only LM, a ViT-style encoder, and the
one-layer in-context regression transformer.

Every layer's token mixer is a registry spec (``"mha"``, ``"moba(block=16, topk=2)"``; one spec for all layers or
one per layer). :func:`plan_mixer` decides how to call a variant as a ``[B, N, C] -> [B, N, C]`` mixer, or why it
cannot serve a model, from what the variant DECLARES (:class:`headwise.variants.base.Capabilities`, its config
fields, and its :meth:`~headwise.variants.base.Variant.unsupported_length` and
:meth:`~headwise.variants.base.Variant.causal_leak` for the task's length) -- never by trying calls:

* **config fields** (:func:`headwise.variants.registry.config_fields`): ``dim``, ``heads``, ``grid`` (the patch grid
  of an image model), ``tokens`` (the sequence length, for token-MLP mixers), ``ndim`` (2 on a grid, else 1),
  ``layer`` / ``num_layers`` (the layer index and depth). Any other config field without a default must be given
  in the spec.
* **capabilities**: ``inputs`` (a forward that needs a second input cannot serve), ``mixer`` (the output must
  have the input's shape), ``layout`` (``"image"`` mixers get the ``[B, C, h, w]`` feature map of the tokens and
  need a grid; ``"tokens"`` and ``"set"`` get ``[B, N, C]``), ``grid`` (``"required"`` cannot serve a 1-D task),
  ``output`` (a tuple contributes its first element), ``causal``: a causal model sets ``causal=True`` on
  ``"optional"``, takes ``"always"`` as is and refuses ``"none"``; a variant whose causal mode is not strictly
  causal at the task's length (:meth:`causal_leak`) is refused with its reason.

:func:`plan_mixer` raises :class:`Unsupported` (a ``ValueError``) with the reason; the arena writes it in the
leaderboard row. New registry entries are picked up without code changes. ``tests/variants/test_capabilities.py``
checks every declaration against the module's behaviour.

Builders: :func:`build_lm`, :func:`build_vit`, :func:`build_regression`. Every module keeps its mixers'
``aux_loss`` (MoH-style router losses) reachable through :func:`aux_loss`.

>>> lm = build_lm("mha", vocab=256, dim=64, depth=2, heads=4, max_len=64)     # tokens [B, N] -> logits [B, N, V]
>>> vit = build_vit("lka", image_size=28, patch=4, classes=10)                  # images [B, 1, 28, 28] -> [B, 10]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import headwise
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
    grid: tuple | None = None  # (h, w): the image model's patch grid (config grid=; the "image" layout's shape)
    causal: bool = False  # the mixer is causal (declared: causal=True set, or causal by construction)
    note: str = ""  # how causality was obtained ("causal=True", "causal by construction")

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


def _call(module: nn.Module, x: Tensor, plan: MixerPlan) -> Tensor:
    """Apply ``module`` to tokens ``x`` ``[B, N, C]`` as ``plan`` says; ``[B, N, C]`` out."""
    B, N, C = x.shape
    if plan.layout == "image":
        h, w = plan.grid
        x = x.transpose(1, 2).reshape(B, C, h, w).contiguous()  # (B, C, h, w)
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out  # capabilities.output "tuple": the first element
    if plan.layout == "image":
        y = y.flatten(2).transpose(1, 2)  # (B, N, C)
    return y


def plan_mixer(spec: str, *, dim: int, heads: int, seq_len: int, causal: bool = False,
               grid: tuple[int, int] | None = None, defaults: dict | None = None) -> MixerPlan:
    """Decide how ``spec`` serves as a mixer of width ``dim`` with ``heads`` heads on ``seq_len`` tokens
    (``causal``: autoregressive model; ``grid``: ``(h, w)`` patch grid with ``h * w = seq_len``) from its declared
    capabilities (module docstring). ``defaults``: further config keywords for the variants whose config has them
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
    spec_kwargs = cls.resolve_aliases(spec_kwargs)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    kwargs: dict[str, Any] = {}
    filled = (("dim", dim), ("heads", heads), ("tokens", seq_len), ("ndim", 2 if grid else 1),
              *(defaults or {}).items())
    for key, value in filled:
        if key in fields and key not in spec_kwargs:
            kwargs[key] = value
    declared = cls.capabilities
    if grid is not None and "grid" in fields and "grid" not in spec_kwargs:
        kwargs["grid"] = grid
    elif grid is None and declared.grid == "required" and "grid" not in spec_kwargs:
        raise Unsupported(f"{name} needs a 2-D token grid (config field `grid`); this task's inputs are 1-D "
                          f"sequences")
    if declared.layout == "image" and grid is None:
        raise Unsupported(f"{name} reads [B, C, H, W] feature maps (capabilities.layout='image'); this task's inputs "
                          f"are 1-D sequences")
    note = ""
    if causal:
        if declared.causal == "none":
            raise Unsupported(f"{name} has no causal mode (capabilities.causal='none'); this task trains a causal "
                              f"model")
        if declared.causal == "optional":
            if spec_kwargs.get("causal") is False:
                raise Unsupported("the spec sets causal=False but this task trains a causal model")
            kwargs["causal"] = True
            note = "causal=True"
        else:
            note = "causal by construction"
    layer_keys = tuple(k for k in ("layer", "num_layers") if k in fields and k not in spec_kwargs)
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and k not in kwargs and k not in spec_kwargs
               and k not in layer_keys]
    if missing:
        raise Unsupported(f"{name}: config field(s) {missing} have no default; give them in the spec, e.g. "
                          f"{name}({missing[0]}=...)")
    plan = MixerPlan(spec, name, kwargs, layer_keys, "image" if declared.layout == "image" else "tokens", grid,
                     causal, note)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's stream alone
        try:
            module = plan.create()
        except (ValueError, TypeError) as e:
            raise Unsupported(f"cannot build {spec} at dim={dim}: {first_line(e)}") from None
    caps = module.caps  # the capabilities of this configuration
    if caps.inputs:
        raise Unsupported(f"{name}.forward needs {list(caps.inputs)} besides x: not a self-attention mixer")
    if not caps.mixer:
        raise Unsupported(f"{name}'s output does not have its input's shape (capabilities.mixer=False): not a token "
                          f"mixer")
    reason = module.unsupported_length(seq_len)
    if reason is not None:
        raise Unsupported(f"{name} cannot run on {seq_len} tokens: {reason}")
    if causal:
        if caps.causal == "none":  # a configuration without the causal mode (e.g. normalising over the tokens)
            raise Unsupported(f"{spec} has no causal mode in this configuration; this task trains a causal model")
        leak = module.causal_leak(seq_len)
        if leak is not None:
            raise Unsupported(f"{name} is not causal here: {leak}")
    return plan


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
