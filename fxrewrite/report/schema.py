"""The JSON Schema of ``Report.to_dict()`` / ``to_json()`` and a small validator for the subset of JSON Schema it uses.

The document is versioned: ``schema`` is ``"fxrewrite.report.report"`` and ``schema_version`` is
``report.SCHEMA_VERSION``; any incompatible change bumps the version (adding an optional field does not).
Units are stated in the document itself (``units``): MACs are multiply-accumulates (bias not counted), FLOPs = 2 x
MACs, params are elements, latency is in milliseconds. JSON has no infinity or NaN, so non-finite figures (an SQNR
of an exact rewrite is ``inf``) are written as the strings ``"inf"``, ``"-inf"``, ``"nan"``.

The validator understands ``type`` (one or a list), ``properties``, ``required``, ``additionalProperties``,
``items``, ``enum``, ``const``, ``anyOf``, ``minimum`` and local ``$ref`` (``#/$defs/...``); ``description`` and
``title`` are documentation. It is enough for this schema, not a general JSON Schema implementation.

>>> validate({"a": 1}, {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]})
["$: missing required property 'b'", '$.a: expected string, got integer 1']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fxrewrite.errors import FxRewriteError
from fxrewrite.report.report import SCHEMA_VERSION

__all__ = ["REPORT_SCHEMA", "SchemaError", "check_report", "validate"]


class SchemaError(FxRewriteError):
    """A report document does not match ``REPORT_SCHEMA``; the message lists every mismatch with its JSON path."""


def _obj(properties: Mapping[str, Any], *, required: Any = None, extra: bool = False,
         description: str = "") -> dict[str, Any]:
    """An object schema; every property is required unless ``required`` lists a subset."""
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties),
                              "required": list(properties) if required is None else list(required),
                              "additionalProperties": extra}
    if description:
        schema["description"] = description
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"anyOf": [dict(schema), {"type": "null"}]}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_BOOL = {"type": "boolean"}
_INT_OR_NULL = {"type": ["integer", "null"]}
_FLOAT = _ref("float")
_SHAPE = {"type": "array", "items": _COUNT}

_DEFS: dict[str, Any] = {
    "float": {"description": "a number, or 'inf' / '-inf' / 'nan' for non-finite values",
              "anyOf": [{"type": "number"}, {"enum": ["inf", "-inf", "nan"]}]},
    "tensor_meta": _obj({"shape": _SHAPE, "dtype": _STR, "device": _STR,
                         "memory_format": {"enum": ["contiguous", "channels_last", "channels_last_3d", "strided"]}},
                        description="shape, dtype, device and memory format of one tensor (FakeTensor propagation)"),
    "error_stats": _obj({"rel_l2": _FLOAT, "max_abs": _FLOAT, "sqnr_db": _FLOAT, "cosine": _FLOAT, "numel": _COUNT,
                         "nonfinite": _COUNT, "reference_nonfinite": _COUNT},
                        required=["rel_l2", "max_abs", "sqnr_db", "cosine", "numel", "nonfinite"],
                        description="candidate (rewritten) vs reference (original) over all batches; rel_l2 = "
                                    "||a-b||/||b||, sqnr_db = 10 log10(||b||^2/||a-b||^2), figures over elements "
                                    "finite in both; nonfinite counts elements non-finite only in the candidate, "
                                    "reference_nonfinite those non-finite in the reference"),
    "cost_totals": _obj({"params": _COUNT, "macs": _COUNT, "activation_bytes": _COUNT}),
    "record": _obj({
        "site": _STR, "pass_name": _STR, "status": {"enum": ["rewritten", "planned", "skipped"]},
        "code": {"type": ["string", "null"]}, "reason": _STR, "options": {"type": "object"},
        "rule": {"type": ["string", "null"]}, "params_before": _COUNT, "params_after": _COUNT,
        "macs_before": _INT_OR_NULL, "macs_after": _INT_OR_NULL, "rel_error": _nullable(_FLOAT),
        "exact": {"type": ["boolean", "null"]}, "details": {"type": "object"},
    }, extra=True, description="one pass at one site; rel_error is the weight-space ||W-W'||/||W||"),
    "site_check": _obj({
        "site": _STR, "passes": {"type": "array", "items": _STR}, "nodes": {"type": "array", "items": _STR},
        "original_node": {"type": ["string", "null"]},
        **{k: _nullable(_ref("tensor_meta")) for k in ("input_before", "input_after", "output_before",
                                                      "output_after")},
        "local": _nullable(_ref("error_stats")), "accumulated": _nullable(_ref("error_stats")),
        "cost_before": _nullable(_ref("cost_totals")), "cost_after": _nullable(_ref("cost_totals")),
        "shapes_ok": _BOOL, "status": {"enum": ["ok", "failed", "unchecked"]}, "reason": _STR,
    }, description="local: the new subgraph vs the original conv on the same input; accumulated: the rewritten "
                   "model vs the original at the site's output"),
    "output_check": _obj({
        "name": _STR, "before": _nullable(_ref("tensor_meta")), "after": _nullable(_ref("tensor_meta")),
        "shapes_ok": _BOOL, "error": _nullable(_ref("error_stats")),
        "status": {"enum": ["ok", "failed", "unchecked"]}, "reason": _STR,
    }),
    "verification": _obj({
        "ok": _BOOL, "failures": {"type": "array", "items": _STR}, "level": _STR, "rtol": _FLOAT, "atol": _FLOAT,
        "dtype": _STR, "numerics_checked": _BOOL, "numerics_reason": _STR, "batches": _COUNT,
        "mode": {"enum": ["eval"]}, "cost_before": _nullable(_ref("cost_totals")),
        "cost_after": _nullable(_ref("cost_totals")), "sites": {"type": "array", "items": _ref("site_check")},
        "outputs": {"type": "array", "items": _ref("output_check")},
        "timings_s": {"type": "object", "additionalProperties": {"type": "number"}},
    }, description="fxrewrite.verify: shapes (FakeTensors), numerics (skipped with numerics_reason), gates"),
    "site_cost": _obj({"site": _STR, "params_before": _INT_OR_NULL, "params_after": _INT_OR_NULL,
                       "macs_before": _INT_OR_NULL, "macs_after": _INT_OR_NULL}),
    "costs": _obj({
        "params_before": _COUNT, "params_after": _COUNT, "macs_before": _COUNT, "macs_after": _COUNT,
        "activation_bytes_before": _COUNT, "activation_bytes_after": _COUNT,
        "sites": {"type": "array", "items": _ref("site_cost")},
    }, description="analytic costs (fxrewrite.measure.cost.model_cost) of the whole model and per rewritten site"),
    "backend_timing": _obj({
        "backend": {"enum": ["eager", "channels_last", "onnxruntime"]},
        "status": {"enum": ["ok", "skipped", "failed"]}, "reason": _STR,
        **{k: {"type": ["number", "null"]} for k in ("original_ms", "rewritten_ms", "original_min_ms",
                                                      "rewritten_min_ms", "ratio")},
    }, description="median latency in ms; ratio = rewritten / original"),
    "site_timing": _obj({"site": _STR, "original_ms": {"type": "number"}, "rewritten_ms": {"type": "number"},
                         "ratio": _FLOAT}),
    "latency": _obj({
        "units": _STR, "runs": {"type": "integer", "minimum": 1}, "warmup": _COUNT,
        "threads": {"type": "integer", "minimum": 1}, "device": _STR,
        "input_shapes": {"type": "array", "items": _SHAPE}, "torch_version": _STR,
        "backends": {"type": "array", "items": _ref("backend_timing")},
        "sites": {"type": "array", "items": _ref("site_timing")},
    }, description="fxrewrite.measure.latency.measure_latency"),
}

#: JSON Schema (draft 2020-12 vocabulary) of ``Report.to_dict()`` at ``SCHEMA_VERSION``.
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://fxrewrite.invalid/schemas/report-{SCHEMA_VERSION}.json",
    "title": "fxrewrite report",
    "description": "What a plan or a rewrite did, per site and in total, with its costs, verification and latency.",
    **_obj({
        "schema": {"const": "fxrewrite.report.report"},
        "schema_version": {"const": SCHEMA_VERSION},
        "fxrewrite_version": _STR,
        "torch_version": _STR,
        "units": {"type": "object", "required": ["macs", "flops", "params"],
                  "additionalProperties": _STR},
        "title": _STR,
        "input_shapes": {"type": "array", "description": "one entry per positional input: a shape, or a repr"},
        "passes": {"type": "array", "items": _STR, "description": "pipeline specs, e.g. 'grouped{groups=4}'"},
        "context": {"type": "object"},
        "totals": _obj({k: _COUNT for k in ("sites", "changed", "skipped", "params_before", "params_after",
                                            "macs_before", "macs_after")},
                       description="over the changed (rewritten/planned) sites only"),
        "records": {"type": "array", "items": _ref("record")},
        "costs": _nullable(_ref("costs")),
        "verification": _nullable(_ref("verification")),
        "latency": _nullable(_ref("latency")),
        "sections": {"type": "object", "additionalProperties": _STR},
    }),
    "$defs": _DEFS,
}

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list | tuple),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),  # strict JSON
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _type_name(value: Any) -> str:
    return next((name for name in ("null", "boolean", "integer", "number", "string", "array", "object")
                 if _TYPES[name](value)), type(value).__name__)


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _shallow_ok(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> bool:
    """Whether ``value`` has the type / const / enum ``schema`` asks for, not looking inside it."""
    if "$ref" in schema:
        return _shallow_ok(value, _resolve(schema["$ref"], root), root)
    if "anyOf" in schema:
        return any(_shallow_ok(value, option, root) for option in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    allowed = schema.get("type")
    return allowed is None or any(_TYPES[t](value) for t in (allowed if isinstance(allowed, list) else [allowed]))


def _check(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if "$ref" in schema:
        _check(value, _resolve(schema["$ref"], root), root, path, errors)
        return
    if "anyOf" in schema:
        branches = []
        for option in schema["anyOf"]:
            sub: list[str] = []
            _check(value, option, root, path, sub)
            if not sub:
                return
            branches.append((option, sub))
        fitting = [sub for option, sub in branches if _shallow_ok(value, option, root)]
        if len(fitting) == 1:  # one form has the right type: the mismatch is inside it, say where
            errors.extend(fitting[0])
        else:
            detail = " | ".join("; ".join(sub) for _, sub in branches)
            errors.append(f"{path}: matches no allowed form ({detail})")
        return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: expected one of {schema['enum']}, got {value!r}")
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in allowed):
            errors.append(f"{path}: expected {' or '.join(allowed)}, got {_type_name(value)} {value!r}"[:300])
            return
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required property {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _check(item, props[key], root, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, Mapping):
                _check(item, extra, root, f"{path}.{key}", errors)
    if isinstance(value, list | tuple) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", errors)


def validate(instance: Any, schema: Mapping[str, Any] = REPORT_SCHEMA) -> list[str]:
    """Every mismatch between ``instance`` and ``schema`` as ``"$.json.path: what is wrong"`` (empty when valid)."""
    errors: list[str] = []
    _check(instance, schema, schema, "$", errors)
    return errors


def check_report(document: Mapping[str, Any]) -> None:
    """Raise ``SchemaError`` listing every mismatch when ``document`` (a ``Report.to_dict()``, or the parsed
    ``to_json()``) does not follow ``REPORT_SCHEMA``.

    >>> from fxrewrite.report.report import Report
    >>> check_report(Report(()).to_dict())
    """
    errors = validate(document)
    if errors:
        raise SchemaError(f"the report does not follow fxrewrite.report.report schema_version "
                          f"{REPORT_SCHEMA['properties']['schema_version']['const']}:\n  " + "\n  ".join(errors))
