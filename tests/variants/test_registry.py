"""The variant registry: names, spec strings, config validation and the errors users see."""

import re

import pytest
import torch
from torch import nn

import headwise
from headwise.variants import registry
from headwise.variants.mha import MultiHeadAttention


def test_available_lists_sorted_builtin_names():
    names = headwise.available()
    assert names == sorted(names)
    assert {"mha", "gqa", "mqa"} <= set(names)


def test_every_registered_variant_follows_the_contract():
    """Config is a dataclass whose fields are exactly the constructor keywords; the module stores its config."""
    import dataclasses
    import inspect

    for name in headwise.available():
        cls = registry.get(name)
        assert cls.registry_name == name
        fields = [f.name for f in dataclasses.fields(cls.Config)]
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert set(fields) == set(params), name
        assert registry.config_fields(name) == fields


def test_create_spec_overrides_call_keywords():
    m = headwise.create("mha(heads=1)", dim=64, heads=8)
    assert isinstance(m, MultiHeadAttention)
    assert (m.config.heads, m.config.head_dim, m.config.kv_heads) == (1, 64, 1)
    assert m(torch.randn(2, 5, 64)).shape == (2, 5, 64)


def test_create_spec_adds_keywords():
    m = headwise.create("gqa(kv_heads=4, qkv_bias=False, dropout=0.25)", dim=64, heads=8)
    assert (m.config.kv_heads, m.config.qkv_bias, m.config.dropout) == (4, False, 0.25)
    assert m.q_proj.bias is None


def test_create_plain_name_uses_call_keywords():
    m = headwise.create("  mha  ", dim=48, heads=6, backend="reference")
    assert (m.config.dim, m.config.heads, m.config.head_dim, m.config.backend) == (48, 6, 8, "reference")


def test_create_passes_validation_errors_through():
    with pytest.raises(ValueError, match=re.escape("kv_heads=3")):
        headwise.create("mha(kv_heads=3)", dim=64, heads=8)


def test_unknown_variant_lists_available_names():
    with pytest.raises(ValueError, match=re.escape("unknown variant name='nope'")) as info:
        headwise.create("nope", dim=64, heads=8)
    assert "available: " + ", ".join(headwise.available()) in str(info.value)


def test_unknown_config_key_names_key_and_valid_keys():
    with pytest.raises(ValueError) as info:
        headwise.create("mha(blocks=4)", dim=64, heads=8, window=3)
    msg = str(info.value)
    assert "['blocks', 'window']" in msg and "'mha'" in msg
    assert "valid keys: " + str(sorted(registry.config_fields("mha"))) in msg


def test_missing_required_field_is_a_clear_error():
    with pytest.raises(ValueError, match=r"bad config for variant 'mha'.*dim"):
        headwise.create("mha", heads=8)


@pytest.mark.parametrize(
    "spec, error, fragment",
    [
        ("mha(", ValueError, "malformed variant spec 'mha('"),
        ("mha(1)", ValueError, "arguments must be keywords"),
        ("mha(x=foo)", ValueError, "value of 'x' is not a literal (foo)"),
        ("mha(**k)", ValueError, "** is not allowed"),
        ("", ValueError, "malformed variant spec ''"),
        (42, TypeError, "spec must be a string, got int: 42"),
        (None, TypeError, "spec must be a string, got NoneType"),
    ],
    ids=["unclosed", "positional", "not-literal", "double-star", "empty", "int", "none"],
)
def test_malformed_spec_is_a_clear_error(spec, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        headwise.create(spec, dim=64, heads=8)


def test_register_rejects_a_class_without_config():
    class NoConfig(nn.Module):
        pass

    with pytest.raises(TypeError, match="needs a `Config` dataclass"):
        registry.register("no-config-test")(NoConfig)
    assert "no-config-test" not in headwise.available()


def test_register_rejects_a_taken_name():
    class Other(MultiHeadAttention):
        pass

    with pytest.raises(ValueError, match=re.escape("variant name='mha' is already registered to MultiHeadAttention")):
        registry.register("mha")(Other)
    assert registry.get("mha") is MultiHeadAttention


def test_register_same_class_twice_is_idempotent():
    assert registry.register("mha")(MultiHeadAttention) is MultiHeadAttention
    assert registry.get("mha") is MultiHeadAttention


@pytest.mark.parametrize("name", headwise.available())
def test_the_registry_name_finds_its_file(name):
    """One file per mechanism: ``variants/<name>.py``, or a paper family's file whose docstring names it."""
    import sys

    cls = registry.get(name)
    module = sys.modules[cls.__module__]
    assert cls.__module__.startswith("headwise.variants.")
    assert cls.__module__.rsplit(".", 1)[1] == name or f'``"{name}"``' in module.__doc__.split("\n\n")[0], name
