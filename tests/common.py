"""Helpers shared by the tests: ``from common import ...`` from any test file (tests/ has no ``__init__.py`` and its
subfolders do, so pytest puts tests/ itself on ``sys.path``).

Inputs are float64 and come from their own seeded generators, so a test does not depend on what ran before it.
Gradients are compared through a fixed random projection of the outputs (not ``.sum()``, where symmetric errors
cancel). A ``tol`` is a number (``rtol = atol = tol``) or a dict of ``torch.testing.assert_close`` keywords.
``assert_*`` helpers check the tensors or modules they are given; ``check_*`` helpers build a module from a variant
spec first (the shared contract tests of the registered variants).
"""

import torch

import headwise

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)  # float64 fast path against its reference
ABS_TOL = dict(rtol=0, atol=1e-10)  # the same, absolute only


# ---- inputs and modules -----------------------------------------------------------------------------------------


def rand(*shape, seed=0, dtype=F64, requires_grad=False):
    """A standard-normal tensor drawn from a generator seeded with ``seed`` (torch's global RNG is untouched)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(requires_grad)


def build(spec, seed=0, dtype=F64, **kw):
    """``headwise.create(spec, **kw)`` right after ``torch.manual_seed(seed)``, cast to ``dtype`` (None: as
    created)."""
    torch.manual_seed(seed)
    m = headwise.create(spec, **kw)
    return m if dtype is None else m.to(dtype)


def randomize_(module, scale=0.3, seed=7):
    """Moves every parameter of ``module`` by ``scale`` times fixed noise, away from an initial value where some
    gradients are structurally zero (identity or zero inits); returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def mha_like(m):
    """A float64 ``MultiHeadAttention`` holding ``m``'s q/k/v and output projection weights (same sizes)."""
    from headwise.variants.mha import MultiHeadAttention

    ref = MultiHeadAttention(m.dim, m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items()
                         if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "out_proj")})
    return ref


def fused_checkpoint(state, parts=("k_proj", "v_proj"), fused="kv_proj", *, within=("",), prefix=""):
    """``state`` as an older checkpoint held it: in each submodule named in ``within`` (``""``: the module itself)
    the ``parts`` projections stacked row-wise, weights and biases, into one ``fused`` projection; then every key
    under ``prefix`` (e.g. ``"attn."`` for a module that used to wrap another)."""
    old = dict(state)
    for sub in within:
        at = f"{sub}." if sub else ""
        for kind in ("weight", "bias"):
            old[f"{at}{fused}.{kind}"] = torch.cat([old.pop(f"{at}{p}.{kind}") for p in parts])
    return {prefix + k: v for k, v in old.items()}


def assert_loads_old_checkpoint(fresh, old_state, m, *inputs):
    """``fresh`` loads ``old_state`` (``m``'s weights in an older checkpoint layout) and then computes exactly what
    ``m`` computes on ``inputs``."""
    fresh.load_state_dict(old_state)
    torch.testing.assert_close(fresh(*inputs), m(*inputs), rtol=0, atol=0)


# ---- gradients --------------------------------------------------------------------------------------------------


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _tol(tol):
    return dict(rtol=tol, atol=tol) if isinstance(tol, (int, float)) else dict(tol)


def projections(out, seed=0):
    """Fixed standard-normal weights for the tensor ``out`` or each tensor of a sequence ``out``: the i-th from
    ``seed + i`` when ``seed`` is an int, drawn in turn from ``seed`` when it is a ``torch.Generator``, or from
    torch's global RNG when it is None."""
    outs = _as_list(out)
    if seed is None or isinstance(seed, torch.Generator):
        return [torch.randn(o.shape, generator=seed, dtype=o.dtype) for o in outs]
    return [rand(*o.shape, seed=seed + i, dtype=o.dtype) for i, o in enumerate(outs)]


def _projected(out, weights):
    return sum((o * w).sum() for o, w in zip(_as_list(out), weights, strict=True))


def grads(out, wrt, seed=0, allow_unused=False):
    """Gradients to ``wrt`` of a fixed random projection ``sum((out * G).sum())`` of ``out`` (a tensor or a
    sequence of them; ``G`` from :func:`projections`)."""
    return torch.autograd.grad(_projected(out, projections(out, seed)), wrt, allow_unused=allow_unused)


def assert_same_grads(out, ref, wrt, tol=1e-10, seed=0, *, ref_wrt=None, allow_unused=False):
    """``out`` and ``ref``, projected on the same fixed random weights, have the same gradients: ``out``'s to
    ``wrt``, ``ref``'s to ``ref_wrt`` (default ``wrt``). With ``allow_unused`` a tensor one side does not reach
    (None) must get no gradient or an all-zero one on the other. Returns ``out``'s gradients."""
    weights = projections(out, seed)
    got = torch.autograd.grad(_projected(out, weights), wrt, allow_unused=allow_unused)
    want = torch.autograd.grad(_projected(ref, weights), wrt if ref_wrt is None else ref_wrt, allow_unused=allow_unused)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0, f"gradient to wrt[{i}]"
            continue
        torch.testing.assert_close(a, b, **_tol(tol), msg=lambda m: f"gradient to wrt[{i}]: {m}")
    return got


def assert_same_forward_and_grads(out, ref, wrt, tol=1e-10, seed=0, *, grad_tol=None, ref_wrt=None,
                                  allow_unused=False):
    """``out`` equals ``ref`` within ``tol`` and so do their gradients (within ``grad_tol``, default ``tol``; see
    :func:`assert_same_grads`, whose result it returns)."""
    torch.testing.assert_close(out, ref, **_tol(tol))
    return assert_same_grads(out, ref, wrt, tol if grad_tol is None else grad_tol, seed, ref_wrt=ref_wrt,
                             allow_unused=allow_unused)


def assert_all_params_get_grads(module, out, seed=1):
    """Every parameter of ``module`` gets a finite, non-zero gradient from a fixed random projection of ``out`` (a
    tensor or a sequence of them, see :func:`projections`)."""
    params = dict(module.named_parameters())
    for name, g in zip(params, grads(out, list(params.values()), seed, allow_unused=True)):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name} has a zero or non-finite gradient"


def assert_backward_reaches_every_parameter(module, out, x=None):
    """Backpropagating ``out.square().sum()`` (plus ``module.aux_loss`` where the module has one) gives every
    parameter of ``module``, and the input ``x`` when given, a finite gradient that is not all zero."""
    loss = out.square().sum()
    if hasattr(module, "aux_loss"):
        loss = loss + module.aux_loss
    loss.backward()
    for name, p in ([("x", x)] if x is not None else []) + list(module.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---- decoding ---------------------------------------------------------------------------------------------------


def assert_decoding_equals_forward(m, x, schedule, tol=1e-10):
    """Decoding ``x`` with ``m`` piece by piece from no state, ``schedule`` a list of ``("prefill", n)`` (one
    ``m.prefill`` over the next n tokens) and ``("step", n)`` (``m.step`` on each of the next n tokens), carrying
    the state, gives ``m(x)``."""
    full = m(x)
    state, outs, t = None, [], 0
    for kind, n in schedule:
        if kind == "prefill":
            y, state = m.prefill(x[:, t:t + n], state)
            outs.append(y)
        else:
            for i in range(t, t + n):
                y_t, state = m.step(x[:, i], state)
                outs.append(y_t[:, None])
        t += n
    assert t == x.shape[1], f"the schedule covers {t} of {x.shape[1]} tokens"
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **_tol(tol))


# ---- the token-selection ops (topk, dma) ------------------------------------------------------------------------


def qkvz(N, M=None, *, H=4, H_kv=2, D=8, Dv=6, seed=0, dtype=F64, tied_z=True):
    """q ``[2, H, N, D]``, k ``[2, H_kv, M, D]``, v ``[2, H_kv, M, Dv]`` and a per-key bias z ``[2, H_kv, M]``
    (rounded when ``tied_z``: few distinct values, so the tie rule decides the selection), all requiring grad."""
    M = N if M is None else M
    q, k, v = rand(2, H, N, D, seed=seed, dtype=dtype), rand(2, H_kv, M, D, seed=seed + 1, dtype=dtype), \
        rand(2, H_kv, M, Dv, seed=seed + 2, dtype=dtype)
    z = rand(2, H_kv, M, seed=seed + 3, dtype=dtype)
    if tied_z:
        z = z.round()  # few distinct values: the tie rule decides the selection
    return [t.requires_grad_() for t in (q, k, v, z)]


# ---- the block-selection variants (moba, vmoba, hip) ------------------------------------------------------------


def assert_module_matches_projected_reference(m, x, naive, **kwargs):
    """``m(x)`` equals its own projections around ``naive(q, k, v, **kwargs)[0]`` and its output projection, and
    so do the gradients to ``x`` and every parameter (float64, :data:`TOL`)."""
    x = x.clone().requires_grad_()
    out = m(x)
    ref = m.finish(naive(*m.project(x), **kwargs)[0])
    assert_same_forward_and_grads(out, ref, [x, *m.parameters()], TOL, seed=7)


def assert_selection_covering_everything_is_mha(spec, causal):
    """``spec`` (dim 16, 2 heads, one key/value head) with the projections of an ``mha`` is that ``mha``."""
    m = build(spec, dim=16, heads=2, kv_heads=1)
    mha = build("mha", dim=16, heads=2, kv_heads=1, causal=causal)
    mha.load_state_dict(m.state_dict())  # the same projections
    x = rand(2, 64, 16, seed=1)
    torch.testing.assert_close(m(x), mha(x), **TOL)
