"""Spec strings: ``"name"`` / ``"name(key=literal, ...)"``, parsed without evaluating anything."""

import re

import pytest

from headwise.spec import parse_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mha", ("mha", {})),
        ("mha()", ("mha", {})),
        ("  mha(heads=1)  ", ("mha", {"heads": 1})),
        ("moba(block=512, topk=4)", ("moba", {"block": 512, "topk": 4})),
        ("n(kernel_size=(7, 7), causal=True, tag='a', x=None)", ("n", {"kernel_size": (7, 7), "causal": True, "tag": "a", "x": None})),
        ("p(offset=-3, rate=1e-3, dims=[1, 2], m={'a': 1})", ("p", {"offset": -3, "rate": 1e-3, "dims": [1, 2], "m": {"a": 1}})),
    ],
    ids=["name", "empty-call", "whitespace", "two-ints", "tuple-bool-str-none", "neg-float-list-dict"],
)
def test_parse(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("mha(", "'(' was never closed"),
        ("mha(1)", "arguments must be keywords (key=value)"),
        ("mha(*a)", "arguments must be keywords (key=value)"),
        ("mha(x=foo)", "value of 'x' is not a literal (foo)"),
        ("mha(x=1+2)", "value of 'x' is not a literal (1 + 2)"),
        ("mha(x=__import__('os').getcwd())", "value of 'x' is not a literal"),
        ("mha(**k)", "** is not allowed"),
        ("", "malformed variant spec ''"),
        ("mha x", "malformed variant spec 'mha x'"),
        ("a.b", "expected name or name(key=value, ...)"),
        ("mha(x=1)(y=2)", "expected name or name(key=value, ...)"),
        ("42", "expected name or name(key=value, ...)"),
    ],
    ids=["unclosed", "positional", "star", "name-value", "expression", "call-value", "double-star", "empty",
         "two-words", "attribute", "double-call", "number"],
)
def test_malformed_spec_names_it(spec, fragment):
    with pytest.raises(ValueError, match=re.escape(f"malformed variant spec {spec!r}")) as info:
        parse_spec(spec)
    assert fragment in str(info.value)


def test_repeated_key_is_an_error():
    with pytest.raises(ValueError, match="'heads'"):
        parse_spec("mha(heads=1, heads=2)")


@pytest.mark.parametrize("spec", [None, 42, b"mha", ["mha"]], ids=["none", "int", "bytes", "list"])
def test_non_string_spec_is_a_type_error(spec):
    with pytest.raises(TypeError, match=re.escape(f"spec must be a string, got {type(spec).__name__}")):
        parse_spec(spec)
