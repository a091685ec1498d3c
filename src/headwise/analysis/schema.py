"""The JSON schema of ``metrics.json`` (written by :mod:`headwise.analysis.report`) and a small validator.

:func:`validate` checks the JSON-Schema subset the schema uses (``type`` incl. lists of types, ``properties``,
``required``, ``additionalProperties`` (bool or schema), ``items``, ``enum``, ``minimum``, ``minItems``) so that
no extra dependency is needed; the schema itself is standard draft 2020-12 and also validates with ``jsonschema``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["METRICS_SCHEMA", "validate", "check"]

_NUM = {"type": ["number", "null"]}  # NaN is written as null
_VEC = {"type": "array", "items": _NUM}
_VEC_OR_NULL = {"type": ["array", "null"], "items": _NUM}
_MATRIX = {"type": "array", "items": _VEC}

_HEAD_METRICS = {
    "type": "object",
    "required": ["heads", "entropy", "mean_distance", "special_attention", "sink_head", "sink_tokens"],
    "additionalProperties": False,
    "properties": {
        "heads": {"type": "integer", "minimum": 1},
        "source": {"type": "string"},
        "entropy": _VEC,  # nats, per head
        "mean_distance": _VEC,  # token (or grid) units, per head
        "special_attention": _VEC,  # mass on the special tokens, per head
        "sink_head": {"type": "array", "items": {"type": "boolean"}},
        "sink_tokens": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "pruning_importance": _VEC_OR_NULL,  # loss increase when the head is masked
        "gradient_importance": _VEC_OR_NULL,  # E |d loss / d gate|
        "divergence": _VEC_OR_NULL,  # head output change when the segment is removed
        "distance_profile": {"type": "array", "items": _VEC},  # [H, K] attention mass per distance
        "massive_activation_tokens": {"type": ["array", "null"], "items": {"type": "integer"}},
        "kq_diagonal": _VEC,  # in-context regression patterns (metrics.icl_patterns), when asked for
        "ov_last_entry": _VEC,
        "kq_homogeneity": _NUM,
        "ov_zero_sum": _NUM,
    },
}

METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "headwise inspect metrics",
    "type": "object",
    "required": ["schema_version", "model", "task", "capture", "layers", "clusters", "rollout", "flow", "gaam",
                 "figures", "notes"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"enum": [1]},
        "model": {
            "type": "object",
            "required": ["name", "class", "parameters"],
            "properties": {
                "name": {"type": "string"},
                "class": {"type": "string"},
                "parameters": {"type": "integer", "minimum": 0},
                "training": {"type": "object"},
            },
        },
        "task": {"type": "object"},
        "capture": {
            "type": "object",
            "required": ["records", "max_queries", "batches"],
            "properties": {
                "max_queries": {"type": ["integer", "null"]},
                "batches": {"type": "integer", "minimum": 1},
                "records": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "source", "heads", "n_queries", "n_keys"],
                        "properties": {
                            "name": {"type": "string"},
                            "source": {"type": "string"},
                            "heads": {"type": "integer", "minimum": 1},
                            "n_queries": {"type": "integer", "minimum": 1},
                            "n_keys": {"type": "integer", "minimum": 1},
                            "pattern": {"type": ["string", "null"]},
                        },
                    },
                },
            },
        },
        "layers": {"type": "object", "additionalProperties": _HEAD_METRICS},
        "clusters": {
            "type": ["object", "null"],
            "required": ["k", "members", "representatives", "explained_variance"],
            "properties": {
                "k": {"type": "integer", "minimum": 1},
                "members": {"type": "array", "items": {
                    "type": "object", "required": ["layer", "head", "cluster"],
                    "properties": {"layer": {"type": "string"}, "head": {"type": "integer"},
                                   "cluster": {"type": "integer"}}}},
                "representatives": {"type": "array", "items": {
                    "type": "object", "required": ["layer", "head", "cluster", "size"],
                    "properties": {"layer": {"type": "string"}, "head": {"type": "integer"},
                                   "cluster": {"type": "integer"}, "size": {"type": "integer"}}}},
                "explained_variance": _VEC,
            },
        },
        "rollout": {"type": ["object", "null"], "required": ["layers", "matrix"],
                    "properties": {"layers": {"type": "array", "items": {"type": "string"}}, "matrix": _MATRIX}},
        "flow": {"type": ["object", "null"], "required": ["sources", "matrix"],
                 "properties": {"sources": {"type": "array", "items": {"type": "integer"}}, "matrix": _MATRIX}},
        "gaam": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["per_head"], "properties": {"per_head": _VEC}}},
        "figures": {"type": "array", "items": {
            "type": "object", "required": ["file", "title"], "additionalProperties": False,
            "properties": {"file": {"type": "string"}, "title": {"type": "string"}, "caption": {"type": "string"}}}},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(instance: Any, schema: dict[str, Any] = METRICS_SCHEMA, path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (the subset described above), as ``"$.a.b: message"`` strings."""
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(instance).__name__}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minimum" in schema and _TYPES["number"](instance) and instance < schema["minimum"]:
        errors.append(f"{path}: {instance} < minimum {schema['minimum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def check(instance: Any, schema: dict[str, Any] = METRICS_SCHEMA) -> None:
    """Raise ``ValueError`` listing the first errors when ``instance`` does not validate."""
    errors = validate(instance, schema)
    if errors:
        raise ValueError(f"metrics do not match the schema ({len(errors)} errors): " + "; ".join(errors[:5]))
