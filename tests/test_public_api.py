"""Guard the public surface: ``headwise.__all__`` changes only on purpose (update this list with it)."""

import headwise

PUBLIC = [
    "MultiHeadAttention",
    "__version__",
    "attention",
    "available",
    "create",
    "linear",
    "merge_attention",
    "patterns",
    "register",
]


def test_all_is_pinned():
    assert sorted(headwise.__all__) == PUBLIC
    assert len(headwise.__all__) == len(set(headwise.__all__))


def test_every_public_name_exists():
    for name in headwise.__all__:
        assert hasattr(headwise, name), name
    for name in headwise.patterns.__all__:
        assert hasattr(headwise.patterns, name), name


def test_version_is_a_string():
    assert isinstance(headwise.__version__, str) and headwise.__version__.count(".") == 2


def test_builtin_variants_registered_on_import():
    assert {"mha", "gqa", "mqa"} <= set(headwise.available())
