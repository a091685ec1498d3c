"""The base of every registered variant.

:class:`Variant` (any registered ``nn.Module``):

* **a config dataclass** ``Config`` from which the constructor is generated: each field is written once, with its
  one-line comment; ``__post_init__`` validates and normalises. ``Variant.__init__`` builds ``self.config`` from
  the call's keywords (required fields may be positional) and calls :meth:`Variant.build`. Renamed keywords stay
  accepted through ``aliases`` (``{"old": "new"}``) with a ``FutureWarning``.
* **declared capabilities** (:class:`Capabilities`): input layout, causal mode, grid, decoding, cross-attention,
  extra inputs, output form, how ``inspect`` sees its attention. Tools (the arena, ``inspect``, the MoA profiler,
  ``ContextParallel``, ``bench variants``) read them instead of trying calls.
* **an example**: ``example_config`` (a small valid config), :meth:`Variant.example_module` and
  :meth:`Variant.example` (small valid inputs for ``forward``).

:class:`ProjectedAttention` (most variants): per-token projections ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` around an attention step: ``forward = finish(attend(*project(x)))``. :class:`SoftmaxAttention` is
the one whose attention step is :func:`headwise.attention` with a pattern (``mha``, ``gqa``, ``mqa``, ``moa`` and
the variants that change what goes into it).

Example, a complete variant (``docs/adding-a-variant.md`` walks through a real one)::

    @register("my_attention")
    class MyAttention(ProjectedAttention):
        "Paper, equations, shapes, defaults, choices made."

        capabilities = Capabilities(causal="optional")

        @dataclass
        class Config(ProjectedAttention.Config):
            temperature: float = 1.0  # divides the scores
            causal: bool = False  # query i sees keys j <= i

            def __post_init__(self):
                super().__post_init__()
                check_number("temperature", self.temperature, 0, low_open=True)
                check_bool("causal", self.causal)

        def attend(self, q, k, v):
            return headwise.attention(q, k, v, Causal() if self.config.causal else None,
                                      scale=self.head_dim ** -0.5 / self.config.temperature)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from headwise.checks import check_bool, check_number, check_positive_int, check_tokens
from headwise.core.attention import BACKENDS, attention
from headwise.patterns import Causal, Pattern, from_spec

__all__ = ["Capabilities", "Variant", "ProjectedAttention", "SoftmaxAttention", "LAYOUTS", "CAUSAL_MODES",
           "GRID_NEEDS", "OUTPUTS", "WEIGHTS", "check_backend", "resolve_pattern", "with_causal",
           "fused_projections", "split_kv_proj", "identity_values", "naive_projections"]

LAYOUTS = ("tokens", "image", "set")
CAUSAL_MODES = ("none", "optional", "always")
GRID_NEEDS = ("none", "optional", "required")
OUTPUTS = ("tensor", "tuple")
WEIGHTS = ("observed", "method", "scores", "none")


@dataclass(frozen=True)
class Capabilities:
    """What a variant declares about itself. Tools read it; ``tests/variants/test_capabilities.py`` checks every
    declaration against the module's behaviour.

    * ``causal``: ``"optional"`` means a config field ``causal`` switches the causal mode on; ``"always"`` that the
      module is causal by construction (output ``i`` depends on inputs ``<= i`` only).
    * ``weights``, what ``headwise inspect`` records: ``"observed"`` (its attention goes through
      :func:`headwise.attention`), ``"method"`` (``attention_weights(*inputs)`` returns probabilities
      ``[B, H, N, M]``), ``"scores"`` (the same method returns an unnormalised mixing matrix: linear attention
      without a denominator), ``"none"`` (no attention matrix).
    * ``softmax``: ``attend(q, k, v)`` is exactly ``headwise.attention(q, k, v, attention_pattern(N, M))`` between
      per-token projections, so tools may run that step their own way (ring attention, a dense profile).
    """

    layout: str = "tokens"  # forward's first input: "tokens" [B, N, C]; "image" [B, C, H, W]; "set" [B, N, C], order-free
    causal: str = "none"  # causal mode: "none", "optional" (config `causal`), "always"
    grid: str = "none"  # token grid (config field `grid`): "none" (not used), "optional" (used when set), "required"
    tokens: bool = False  # sized for one sequence length: the config field `tokens` must equal N
    context: bool = False  # forward(x, context) attends from x to another sequence [B, M, C]
    key_padding: bool = False  # forward(..., key_padding_mask=[B, M] bool, True = padded key)
    inputs: tuple[str, ...] = ()  # further inputs forward requires besides x (then it is not a self-attention mixer)
    output: str = "tensor"  # "tensor": y; "tuple": (y, extras...) with y first
    mixer: bool = True  # y has x's shape: a token mixer that can replace attention inside a block
    decode: bool = False  # prefill(x) -> (y, state) and step(x_t, state) -> (y_t, state) reproduce forward
    weights: str = "observed"  # what inspect records: "observed", "method", "scores" or "none" (above)
    softmax: bool = False  # the attention step is plain softmax attention with attention_pattern (above)

    def __post_init__(self):
        for name, valid in (("layout", LAYOUTS), ("causal", CAUSAL_MODES), ("grid", GRID_NEEDS),
                            ("output", OUTPUTS), ("weights", WEIGHTS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"Capabilities.{name} must be one of {valid}, got {name}={getattr(self, name)!r}")
        for name in ("tokens", "context", "key_padding", "decode", "softmax", "mixer"):
            check_bool(f"Capabilities.{name}", getattr(self, name))
        if not isinstance(self.inputs, tuple) or not all(isinstance(i, str) for i in self.inputs):
            raise TypeError(f"Capabilities.inputs must be a tuple of names, got inputs={self.inputs!r}")

    def describe(self) -> str:
        """One line for ``headwise list``: the declarations that differ from a plain token mixer."""
        parts = [self.layout]
        if self.causal != "none":
            parts.append(f"causal: {self.causal}")
        if self.grid != "none":
            parts.append(f"grid {self.grid}")
        for flag, word in ((self.tokens, "fixed N"), (self.context, "context"), (self.key_padding, "key padding"),
                           (self.decode, "decodes"), (self.softmax, "softmax step")):
            if flag:
                parts.append(word)
        if self.inputs:
            parts.append("needs " + ", ".join(self.inputs))
        if self.output != "tensor":
            parts.append(f"returns a {self.output}")
        if not self.mixer:
            parts.append("not a mixer")
        if self.weights != "observed":
            parts.append(f"weights: {self.weights}")
        return ", ".join(parts)


def _init_signature(config: type) -> inspect.Signature:
    """``(self, <required fields>, *, <fields with defaults>)`` from a config dataclass."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations = {f.name: f.type for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            annotation=annotations[f.name]))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotations[f.name]))
    return inspect.Signature(params)


class Variant(nn.Module):
    """Base of every registered variant (module docstring). Subclasses define ``Config`` (a dataclass),
    ``capabilities``, ``example_config`` and :meth:`build`; the constructor takes the config's fields."""

    Config: ClassVar[type]
    capabilities: ClassVar[Capabilities] = Capabilities()
    aliases: ClassVar[dict[str, str | tuple[str, ...]]] = {}  # renamed keyword -> current name(s), warned
    example_config: ClassVar[dict[str, Any]] = {"dim": 16}  # a small valid config (example_module, tests, docs)
    registry_name: ClassVar[str | None] = None  # set by headwise.variants.register

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__ and "__init__" not in cls.__dict__:
            if not dataclasses.is_dataclass(cls.Config):
                raise TypeError(f"{cls.__qualname__}.Config must be a dataclass")

            def __init__(self, *args, **kwargs):
                Variant.__init__(self, *args, **kwargs)

            __init__.__signature__ = _init_signature(cls.Config)
            __init__.__qualname__ = f"{cls.__qualname__}.__init__"
            __init__.__doc__ = f"Build from the fields of :class:`{cls.__qualname__}.Config`."
            cls.__init__ = __init__

    def __init__(self, *args, **kwargs):
        super().__init__()
        cls = type(self)
        kwargs = cls.resolve_aliases(kwargs)
        signature = inspect.signature(cls.__init__)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{cls.__qualname__}: {e}; fields: {', '.join(list(signature.parameters)[1:])}") from None
        arguments = dict(bound.arguments)
        arguments.pop("self")
        self.config = cls.Config(**arguments)
        self.build(self.config)

    @classmethod
    def resolve_aliases(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with renamed keywords (``cls.aliases``: old name -> new name, or a tuple of new names that
        all take the old value) under their current names, with a ``FutureWarning`` naming both."""
        if not cls.aliases or not set(kwargs) & set(cls.aliases):
            return kwargs
        kwargs = dict(kwargs)
        name = cls.registry_name or cls.__qualname__
        for old, new in cls.aliases.items():
            if old not in kwargs:
                continue
            targets = (new,) if isinstance(new, str) else tuple(new)
            clash = [t for t in targets if t in kwargs]
            if clash:
                raise ValueError(f"{name}: {old}= is the old name of {'= and '.join(targets)}=; give only the new, "
                                 f"got {old}= and {clash[0]}=")
            warnings.warn(f"{name}: {old}= is renamed {'= and '.join(targets)}=; the old name will be removed",
                          FutureWarning, stacklevel=4)
            value = kwargs.pop(old)
            kwargs.update({t: value for t in targets})
        return kwargs

    def build(self, cfg) -> None:
        """Create the parameters and submodules from the validated config (called once by ``__init__``)."""

    # ---- declarations ---------------------------------------------------------------------------------------
    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """The capabilities of a module built from ``config``: the class's declaration, unless a config field
        changes one (e.g. a variant that is causal only for some settings overrides this)."""
        return cls.capabilities

    @property
    def caps(self) -> Capabilities:
        """This module's capabilities (:meth:`capabilities_for` its config)."""
        return type(self).capabilities_for(self.config)

    def causal_leak(self, seq_len: int) -> str | None:
        """Why this causal-mode module is not strictly causal at ``seq_len`` tokens, or None (it is). A variant
        whose causal mode lets an output depend on later inputs in some settings says so here."""
        return None

    def unsupported_length(self, seq_len: int) -> str | None:
        """Why this module cannot run on ``seq_len`` tokens, or None (it can). A variant whose configuration
        restricts the length (a square grid, a divisibility) says so here, so tools need not try."""
        return None

    # ---- examples -------------------------------------------------------------------------------------------
    @classmethod
    def example_module(cls, **overrides) -> Variant:
        """A small module: ``example_config`` updated with ``overrides``."""
        return cls(**{**cls.example_config, **overrides})

    def example_length(self) -> int:
        """Tokens of :meth:`example`'s input: the config's ``tokens``, the product of its ``grid``, else 7."""
        cfg = self.config
        if self.caps.tokens:
            return cfg.tokens
        grid = getattr(cfg, "grid", None)
        return math.prod(grid) if grid else 7

    def example(self, batch: int = 2, *, generator: torch.Generator | None = None) -> tuple:
        """Small valid positional inputs for ``forward`` (random, in the module's dtype and device)."""
        C = self.config.dim
        if self.caps.layout == "image":
            grid = getattr(self.config, "grid", None) or (5, 6)
            return (self.example_randn(batch, C, *grid, generator=generator),)
        return (self.example_randn(batch, self.example_length(), C, generator=generator),)

    def example_randn(self, *shape: int, generator: torch.Generator | None = None) -> Tensor:
        """A standard normal tensor of ``shape`` in the dtype and on the device of the module's parameters
        (for :meth:`example` overrides)."""
        like = next((t for t in self.parameters() if t.is_floating_point()), None)
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        out = torch.randn(*shape, generator=generator, dtype=dtype)
        return out if like is None else out.to(like.device)

    def extra_repr(self) -> str:
        cfg, parts = self.config, []
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required or f.default is dataclasses.MISSING or value != f.default:
                parts.append(f"{f.name}={value!r}")
        return ", ".join(parts)


def check_backend(backend, valid=None) -> None:
    """``backend`` is ``"auto"`` or one of ``valid`` (default: the :func:`headwise.attention` backends)."""
    valid = tuple(BACKENDS) if valid is None else tuple(b for b in valid if b != "auto")
    if backend != "auto" and backend not in valid:
        raise ValueError(f"unknown backend={backend!r}; valid: 'auto', " + ", ".join(map(repr, valid)))


def with_causal(pattern: Pattern | None, causal: bool) -> Pattern | None:
    """``pattern`` restricted to ``j <= i`` when ``causal`` (``Causal()`` for no pattern): what ``causal=True``
    means on every variant that also takes a pattern."""
    if not causal or isinstance(pattern, Causal):
        return pattern
    return Causal() if pattern is None else pattern & Causal()


def resolve_pattern(pattern, heads: int | None = None) -> Pattern | None:
    """A :class:`~headwise.patterns.Pattern`, a pattern spec string or None, checked (a head-specific pattern must
    have ``heads`` heads)."""
    if isinstance(pattern, str):
        pattern = from_spec(pattern)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a headwise Pattern, a pattern spec string or None, "
                        f"got pattern={pattern!r} ({type(pattern).__name__})")
    if pattern is not None and pattern.heads not in (None, heads):
        raise ValueError(f"head-specific pattern has {pattern.heads} heads but heads={heads}")
    return pattern


class ProjectedAttention(Variant):
    """Per-token projections around an attention step: ``forward(x) = finish(attend(*project(x)))``.

    ``q_proj`` (``C -> H D``), ``k_proj`` and ``v_proj`` (``C -> H_kv D``) and ``out_proj`` (``H D -> C``,
    followed by output dropout) are the checkpoint keys of every projected variant. Subclasses implement
    :meth:`attend` ``(q [B, H, N, D], k, v [B, H_kv, M, D]) -> [B, H, N, D]`` and may override ``forward`` when
    they take more inputs (declared in ``capabilities``). Checkpoints written before the projections were split
    (``kv_proj.*``, or ``mha.*`` for the variants that wrapped a :class:`MultiHeadAttention`) still load.
    """

    capabilities = Capabilities()
    example_config = {"dim": 16, "heads": 2}
    fused_qkv_init: ClassVar[bool] = False  # q, k, v were one qkv_proj layer in earlier versions (initialisation)

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of query heads H
        kv_heads: int | None = None  # key/value heads H_kv, H % H_kv == 0; None: the family default (H)
        head_dim: int | None = None  # per-head width D; None: dim // heads
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projection
        dropout: float = 0.0  # dropout probability on the module output, in [0, 1)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.kv_heads is None:
                self.kv_heads = self.default_kv_heads()
            check_positive_int("kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ValueError(f"heads must be a multiple of kv_heads, got heads={self.heads} kv_heads={self.kv_heads}")
            if self.head_dim is None:
                if self.dim % self.heads:
                    raise ValueError(f"dim must be divisible by heads when head_dim is None, got dim={self.dim} "
                                     f"heads={self.heads}; pass head_dim= to choose the head width")
                self.head_dim = self.dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            check_bool("qkv_bias", self.qkv_bias)
            check_bool("out_bias", self.out_bias)
            self.dropout = check_number("dropout", self.dropout, 0, 1, high_open=True)

        def default_kv_heads(self) -> int:
            """``kv_heads`` when not given: one key/value head per query head."""
            return self.heads

    def build(self, cfg) -> None:
        self.q_proj, self.k_proj, self.v_proj = self.input_projections(cfg)
        self.out_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self._register_load_state_dict_pre_hook(split_kv_proj, with_module=True)

    def input_projections(self, cfg) -> list[nn.Linear]:
        """``q_proj`` (``C -> H D``), ``k_proj`` and ``v_proj`` (``C -> H_kv D``), initialised as the fused layers of
        earlier versions (:func:`fused_projections`): ``q`` and ``k|v``, or one ``q|k|v`` layer where
        ``fused_qkv_init``; so, for a given seed, the initial weights did not change when they were split."""
        H, F = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if self.fused_qkv_init:
            return fused_projections(cfg.dim, [H, F, F], bias=cfg.qkv_bias)
        return [nn.Linear(cfg.dim, H, bias=cfg.qkv_bias), *fused_projections(cfg.dim, [F, F], bias=cfg.qkv_bias)]

    # the sizes every attention step needs, read from the config
    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def heads(self) -> int:
        return self.config.heads

    @property
    def kv_heads(self) -> int:
        return self.config.kv_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Check ``x`` ``[B, N, C]`` and ``context`` ``[B, M, C]`` (``x`` when None) and project them to
        ``q`` ``[B, H, N, D]``, ``k`` and ``v`` ``[B, H_kv, M, D]``."""
        check_tokens("x", x, self.dim)
        if context is None:
            context = x
        else:
            check_tokens("context", context, self.dim)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"x and context batch sizes differ: x.shape={tuple(x.shape)}, "
                                 f"context.shape={tuple(context.shape)}")
        return self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(context)), \
            self.split_heads(self.v_proj(context))

    def split_heads(self, t: Tensor) -> Tensor:
        """``[B, N, heads * D]`` -> ``[B, heads, N, D]`` with ``D = head_dim`` (queries, keys or values)."""
        B, N, _ = t.shape
        return t.view(B, N, -1, self.head_dim).transpose(1, 2)

    def finish(self, out: Tensor) -> Tensor:
        """Head outputs ``[B, H, N, D]`` -> ``[B, N, C]``: merge the heads, output projection, dropout."""
        B, H, N, D = out.shape
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, N, H * D)))  # (B, N, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention step: ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, M, D]`` -> ``[B, H, N, D]``."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement attend(q, k, v)")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        return self.finish(self.attend(*self.project(x)))

    def attention_weights(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The attention probabilities ``[B, H, N, M]`` from ``x`` ``[B, N, C]`` to ``context`` (``x`` when None):
        the attention step applied to identity values ``V = I`` (:func:`identity_values`; its output is then its
        attention matrix, exact for every step linear in ``v``; ``O(M^2)`` memory, for inspection sizes). What
        ``inspect`` records for variants that declare ``weights="method"``; also right for a softmax step
        (``capabilities.softmax``). Any other variant raises ``NotImplementedError`` rather than return a matrix
        that is not its attention (a routed or reweighted step)."""
        caps = self.caps
        if not (caps.softmax or caps.weights in ("method", "scores")):
            raise NotImplementedError(
                f"{type(self).__qualname__} declares weights={caps.weights!r}: its attention step applied to identity "
                f"values is not its attention matrix; record it with headwise.inspect.capture instead")
        q, k, _ = self.project(x) if context is None else self.project(x, context)
        return self.attend(q, k, identity_values(k))  # (B, H, N, M)


def naive_projections(m: ProjectedAttention, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The projections of a :class:`~headwise.variants.base.ProjectedAttention` written out with ``F.linear``:
    ``q`` ``[B, H, N, D]`` from ``x``, ``k``, ``v`` ``[B, H_kv, M, D]`` from ``context`` (``x`` when None); the
    start of every module-level reference of a projected variant."""
    c = x if context is None else context
    B, N, _ = x.shape
    M = c.shape[1]
    H, H_kv, D = m.heads, m.kv_heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k = F.linear(c, m.k_proj.weight, m.k_proj.bias).view(B, M, H_kv, D).transpose(1, 2)  # (B, H_kv, M, D)
    v = F.linear(c, m.v_proj.weight, m.v_proj.bias).view(B, M, H_kv, D).transpose(1, 2)  # (B, H_kv, M, D)
    return q, k, v


def identity_values(k: Tensor) -> Tensor:
    """``V = I`` ``[B, H_kv, M, M]`` for keys ``k`` ``[B, H_kv, M, D]``: an attention step applied to it returns its
    attention probabilities ``[B, H, N, M]``."""
    B, H_kv, M, _ = k.shape
    return torch.eye(M, dtype=k.dtype, device=k.device).expand(B, H_kv, M, M)  # (B, H_kv, M, M)


def fused_projections(dim: int, features: Sequence[int], *, bias: bool = True) -> list[nn.Linear]:
    """Linear layers ``dim -> features[i]``, initialised as ONE ``dim -> sum(features)`` layer split by rows: for a
    given seed, the same initial weights as the fused projections (``kv_proj``, ``qkv_proj``) of earlier versions,
    and the same random stream afterwards, so seeded results did not change when the projections were split."""
    fused = nn.Linear(dim, sum(features), bias=bias)
    layers = [skip_init(nn.Linear, dim, f, bias=bias) for f in features]
    with torch.no_grad():
        for layer, weight, b in zip(layers, fused.weight.split(list(features)),
                                    fused.bias.split(list(features)) if bias else [None] * len(features)):
            layer.weight.copy_(weight)
            if bias:
                layer.bias.copy_(b)
    return layers


LEGACY_WRAPPERS = ("mha.", "attn.", "body.")  # submodules that held the projections before architecture v2
_PROJECTIONS = ("q_proj.", "k_proj.", "v_proj.", "kv_proj.", "qkv_proj.", "out_proj.")


def split_kv_proj(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: map the keys of older checkpoints onto ``q_proj``, ``k_proj``, ``v_proj``.

    * a wrapper level in front of a projection (``mha.`` of the variants that wrapped a ``MultiHeadAttention``,
      ``attn.`` of ``halo`` / ``msa_conv``, ``body.`` of ``multiscale_heads``) is dropped, unless the module has
      such a child;
    * ``kv_proj.weight`` / ``.bias`` (rows ``[:F]`` the keys, the rest the values) become ``k_proj.*``, ``v_proj.*``;
    * ``qkv_proj.*`` (rows ``[q; k; v]``, equal thirds: ``linear``, ``agent``) become ``q_proj.*``, ``k_proj.*``,
      ``v_proj.*``."""
    for wrapper in LEGACY_WRAPPERS:
        if hasattr(module, wrapper[:-1]):
            continue
        for key in [k for k in state_dict if k.startswith(prefix + wrapper)]:
            rest = key[len(prefix) + len(wrapper):]
            if rest.startswith(_PROJECTIONS):
                state_dict[prefix + rest] = state_dict.pop(key)
    for fused_name, parts in (("kv_proj", ("k_proj", "v_proj")), ("qkv_proj", ("q_proj", "k_proj", "v_proj"))):
        for kind in ("weight", "bias"):
            fused = state_dict.pop(prefix + f"{fused_name}.{kind}", None)
            if fused is not None:
                for name, chunk in zip(parts, fused.chunk(len(parts))):
                    state_dict[prefix + f"{name}.{kind}"] = chunk


class SoftmaxAttention(ProjectedAttention):
    r"""Projected attention whose step is :func:`headwise.attention` with a pattern:

    .. math:: \mathrm{head}_h = \mathrm{softmax}\big(q_h k_{g(h)}^\top / \sqrt{D} + \mathrm{mask}\big)\, v_{g(h)}

    ``mask`` is ``-inf`` where :meth:`attention_pattern` forbids a pair: the config's ``pattern``, intersected with
    :class:`~headwise.patterns.Causal` when ``causal=True``. A query left with no key outputs zeros, never NaN.
    """

    capabilities = Capabilities(causal="optional", softmax=True)

    @dataclass
    class Config(ProjectedAttention.Config):
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        causal: bool = False  # query i sees keys j <= i only (intersected with pattern)
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"

        def __post_init__(self):
            super().__post_init__()
            self.pattern = resolve_pattern(self.pattern, self.heads)
            check_bool("causal", self.causal)
            check_backend(self.backend)

    def build(self, cfg) -> None:
        super().build(cfg)
        pattern = with_causal(cfg.pattern, cfg.causal)  # the config's restriction
        own = self.structural_pattern(cfg)
        self.pattern = own if pattern is None else pattern if own is None else own & pattern  # what every call applies

    def structural_pattern(self, cfg) -> Pattern | None:
        """The pattern that defines the mechanism (a halo, a convolution window), intersected with the config's
        ``pattern`` and ``causal``; None (default): the config's alone."""
        return None

    @property
    def backend(self) -> str:
        return self.config.backend

    def attention_pattern(self, n_q: int, n_kv: int) -> Pattern | None:
        """The pattern of a call with ``n_q`` queries and ``n_kv`` keys (the module's own, whatever the length)."""
        return self.pattern

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, self.attention_pattern(q.shape[2], k.shape[2]), backend=self.backend)
