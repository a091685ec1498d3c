"""Every registered variant: its example runs forward and backward, and every capability it declares holds.

Tools (arena, inspect, MoA profiler, ContextParallel, bench) trust these declarations instead of probing, so each
one is checked here against the module's behaviour. A variant that fails to build or run is a failure, never a skip.
"""

import dataclasses
import inspect

import pytest
import torch

import headwise
from headwise.spec import parse_spec
from headwise.variants import registry
from headwise.variants.base import ProjectedAttention, Variant

F64 = torch.float64
NAMES = headwise.available()


def _declaring(predicate):
    """The registered names whose class-level capabilities satisfy ``predicate`` (for parametrizing)."""
    return [n for n in NAMES if isinstance(getattr(registry.get(n), "capabilities", None), type(Variant.capabilities))
            and predicate(registry.get(n).capabilities)]


def _module(name, **overrides):
    torch.manual_seed(0)
    return registry.get(name).example_module(**overrides).to(F64).eval()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _fields(name):
    return {f.name: f for f in dataclasses.fields(registry.get(name).Config)}


def _required(field):
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


@pytest.mark.parametrize("name", NAMES)
def test_registered_variant_is_on_the_base_with_a_valid_example(name):
    cls = registry.get(name)
    assert issubclass(cls, Variant), f"{name} must subclass headwise.variants.base.Variant"
    assert cls.registry_name == name
    assert cls.__doc__ and len(cls.__doc__) > 200, f"{name} needs a docstring naming its paper and equations"
    m = cls.example_module()
    assert isinstance(m.config, cls.Config)


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_forward_and_backward(name):
    m = _module(name).train()
    inputs = tuple(t.requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in m.example())
    out = m(*inputs)
    caps = m.caps
    assert isinstance(out, tuple) == (caps.output == "tuple"), f"{name}: output form differs from {caps.output!r}"
    y = _first(out)
    x = inputs[0]
    if caps.mixer:
        assert y.shape == x.shape, f"{name}: output {tuple(y.shape)} is not the input's {tuple(x.shape)}"
    else:
        assert y.shape != x.shape, f"{name} declares mixer=False but its output has the input's shape"
    assert torch.isfinite(y).all()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    loss = (y * g).sum() + sum(v for v in [getattr(m, "aux_loss", None)] if torch.is_tensor(v) and v.requires_grad)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), f"{name}: no finite gradient reaches x"
    for pname, p in m.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"


# every registered variant's example, and the other settings of a family that change what runs (routers, GQA,
# causal modes, shared keys, grids): the contract below holds for each
CONTRACT = NAMES + [
    "moh(router='norm')", "moh(compute='dense')", "cascaded_group(grid=(3, 11), kernel_size=3)",
    "gaam(axis='tokens', gaussians=2)", "gaam_attention(kv_heads=2, targets='qkv')", "single_head(causal=True)",
    "attention_experts(share_kv=True, topk=2)", "attention_experts(causal=True, qkv_bias=False)",
    "complex(causal=True)", "rcmha(causal=True, kernel_size=4, max_distance=8)",
    "selective(topk=1, expert_topk=2, causal=True)", "selective(kv_heads=2, topk=3)",
]
# parameters trained by a loss of their own, not through the output (Sparsifiner's connectivity predictor)
OWN_LOSS = {"sparsifiner": lambda m, x: m.distillation_loss(x)}


def _contract_module(spec, dtype=F64, seed=0):
    name, kwargs = parse_spec(spec)
    torch.manual_seed(seed)
    return registry.get(name).example_module(**kwargs).to(dtype).train()


def _outputs(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("spec", CONTRACT)
def test_contract_output_keeps_the_dtype_and_is_finite(spec, dtype):
    m = _contract_module(spec, dtype)
    outputs = [y for y in _outputs(m(*m.example(generator=torch.Generator().manual_seed(1)))) if y.is_floating_point()]
    assert outputs and all(y.dtype == dtype and torch.isfinite(y).all() for y in outputs), spec  # (indices aside)


@pytest.mark.parametrize("spec", CONTRACT)
def test_contract_gradients_reach_every_parameter(spec):
    """Backpropagating every output (plus the router's aux_loss, or the variant's own loss) gives the input and
    every parameter a finite gradient that is not all zero: no parameter is dead."""
    m = _contract_module(spec)
    inputs = m.example(generator=torch.Generator().manual_seed(1))
    x = inputs[0].requires_grad_()
    loss = sum(y.square().sum() for y in _outputs(m(x, *inputs[1:])) if y.is_floating_point())
    aux = getattr(m, "aux_loss", None)
    if torch.is_tensor(aux) and aux.requires_grad:
        loss = loss + aux
    if type(m).registry_name in OWN_LOSS:
        loss = loss + OWN_LOSS[type(m).registry_name](m, x)
    loss.backward()
    for pname, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{spec}: {pname}"


@pytest.mark.parametrize("spec", CONTRACT)
def test_contract_deterministic_under_a_seed(spec):
    outs = []
    for _ in range(2):
        m = _contract_module(spec, seed=7)
        outs += [_outputs(m(*m.example(generator=torch.Generator().manual_seed(1))))[0] for _ in range(2)]
    assert all(torch.equal(outs[0], o) for o in outs[1:]), spec


@pytest.mark.parametrize("name", NAMES)
def test_layout_grid_and_tokens_declarations(name):
    cls, fields = registry.get(name), _fields(name)
    caps = cls.capabilities_for(cls.example_module().config)
    if caps.grid == "none":
        assert "grid" not in fields, f"{name} has a grid field: declare grid='optional' or 'required'"
    else:
        assert "grid" in fields, f"{name} declares grid={caps.grid!r} without a `grid` config field"
        if caps.grid == "optional":
            assert fields["grid"].default is None, f"{name}: an optional grid defaults to None"
        else:  # required: building without it is an error naming the grid
            config = {k: v for k, v in cls.example_config.items() if k != "grid"}
            with pytest.raises((TypeError, ValueError), match="grid"):
                cls(**config)
    assert caps.tokens == ("tokens" in fields), f"{name}: tokens={caps.tokens} vs its config field"
    m = _module(name)
    x = m.example()[0]
    if caps.layout == "image":
        assert x.dim() == 4 and x.shape[1] == m.config.dim
    else:
        assert x.dim() == 3 and x.shape[-1] == m.config.dim


@pytest.mark.parametrize("name", NAMES)
def test_forward_signature_matches_inputs_context_and_padding(name):
    cls = registry.get(name)
    caps = cls.capabilities_for(cls.example_module().config)
    params = list(inspect.signature(cls.forward).parameters.values())[2:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert tuple(required) == caps.inputs, f"{name}: forward requires {required}, declares inputs={caps.inputs}"
    names = {p.name for p in params}
    assert ("context" in names) == caps.context, f"{name}: context={caps.context} vs forward{inspect.signature(cls.forward)}"
    assert ("key_padding_mask" in names) == caps.key_padding, f"{name}: key_padding={caps.key_padding}"


def _causal_module(name):
    cls = registry.get(name)
    caps = cls.capabilities_for(cls.example_module().config)
    if caps.causal == "optional":
        assert "causal" in _fields(name), f"{name} declares causal='optional' without a `causal` config field"
        return _module(name, causal=True)
    return _module(name)


@pytest.mark.parametrize("name", _declaring(lambda c: c.causal != "none"))
def test_declared_causal_mode_is_causal(name):
    m = _causal_module(name)
    x = m.example()[0]
    N = x.shape[1]
    if m.causal_leak(N) is not None:
        pytest.fail(f"{name}'s example config leaks at its own length: {m.causal_leak(N)}")
    with torch.no_grad():
        y = _first(m(x))
        for t in sorted({1, N // 2, N - 1} - {0}):
            x2 = x.clone()
            x2[:, t:] = torch.randn(x2[:, t:].shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
            torch.testing.assert_close(_first(m(x2))[:, :t], y[:, :t], rtol=1e-9, atol=1e-9,
                                       msg=f"{name}: outputs before {t} depend on later tokens")


@pytest.mark.parametrize("name", NAMES)
def test_the_example_length_is_supported(name):
    m = _module(name)
    assert m.unsupported_length(m.example_length()) is None


@pytest.mark.parametrize("name", _declaring(lambda c: c.context))
def test_declared_context_attends_to_another_length(name):
    m = _module(name)
    x = m.example()[0]
    context = torch.randn(x.shape[0], 5, m.config.dim, dtype=F64)
    assert _first(m(x, context)).shape == x.shape


@pytest.mark.parametrize("name", _declaring(lambda c: c.decode))
def test_declared_decoding_reproduces_the_forward(name):
    m = _causal_module(name)
    x = m.example()[0]
    y = m(x)
    y_prompt, state = m.prefill(x[:, :4])
    steps = []
    for t in range(4, x.shape[1]):
        y_t, state = m.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.cat([y_prompt, torch.stack(steps, 1)], 1), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", _declaring(lambda c: c.weights == "method"))
def test_declared_attention_weights_are_probabilities(name):  # ("scores": unnormalised, checked in its own tests)
    m = _module(name)
    x = m.example()[0]
    with torch.no_grad():
        w = m.attention_weights(*m.example())
    B, N = x.shape[0], x.shape[1]
    assert w.dim() == 4 and w.shape[0] == B and w.shape[2] == N, f"{name}: weights {tuple(w.shape)}"
    assert (w >= -1e-12).all()
    rows = w.sum(-1)
    # 1 (or 0 for a query with no key) up to 1e-6: linear attention's normaliser carries an eps of 1e-6 / S
    assert (((rows - 1).abs() < 1e-6) | (rows.abs() < 1e-12)).all(), f"{name}: rows do not sum to 1 (or 0)"


@pytest.mark.parametrize("name", _declaring(lambda c: c.softmax))
def test_declared_softmax_step_is_the_reference_with_its_pattern(name):
    from headwise.variants.mha import naive_mha

    m = _module(name, causal=True) if "causal" in _fields(name) else _module(name)
    x = m.example()[0]
    torch.testing.assert_close(m(x), naive_mha(m, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in _declaring(lambda c: c.weights == "observed" and not c.softmax)
                                  if issubclass(registry.get(n), ProjectedAttention)])
def test_attention_weights_is_refused_where_it_would_not_be_the_attention(name):
    m = _module(name)  # a projected variant inherits attention_weights; where its step is not plain softmax, it refuses
    with pytest.raises(NotImplementedError, match="capture"):
        m.attention_weights(*m.example())
