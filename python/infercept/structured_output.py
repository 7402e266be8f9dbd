"""Structured outputs: what a request's generated tokens must spell, as an llguidance grammar.

A :class:`StructuredOutput` names one constraint (a JSON schema, any JSON object, a regex, a
Lark grammar or a choice of strings); ``SamplingParams(structured_output=...)`` attaches it to
a request and the engine masks the logits so that only tokens the grammar allows can be
sampled (``infercept.engine.structured``). Compilation checks the constraint at construction,
so a bad one is a ``ValueError`` naming what llguidance rejected, before any request exists.

JSON is generated compactly, the way ``json.dumps`` writes it (``", "`` between items,
``": "`` after keys, no other whitespace): that is the format the chat formats teach the
model, and free whitespace lets a small model pad forever instead of closing the object.
A schema's own ``"x-guidance"`` options override this.

Strict by default: an object schema that lists ``properties`` and says nothing of
``additionalProperties`` admits no other keys (OpenAI's strict mode requires this of schemas,
xgrammar assumes it by default). The output still validates against the schema as written; it
just cannot wander into keys nobody asked for, which a small model otherwise does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# llguidance's JSON options for json.dumps' layout (see the module docstring).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else",
                  "propertyNames", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema that lists ``properties`` and leaves
    ``additionalProperties`` unsaid gets ``additionalProperties: false`` (strict mode)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    for key in _ONE_SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = close_objects(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = close_objects(out["additionalProperties"])
    return out


def json_schema_lark(schema: dict[str, Any], strict: bool = True) -> str:
    """A Lark ``%json`` rule body for ``schema``, for embedding in a larger grammar.

    The compact layout is merged under the schema's own ``x-guidance`` options; ``strict``
    closes its objects (``close_objects``).
    """
    options = schema.get("x-guidance")
    merged = {**COMPACT_JSON, **(options if isinstance(options, dict) else {})}
    return "%json " + json.dumps({**(close_objects(schema) if strict else schema),
                                  "x-guidance": merged})


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal (JSON's escaping is a subset Lark reads)."""
    return json.dumps(text)


def check_grammar(grammar: str, what: str) -> None:
    """Raises ValueError with llguidance's message when it rejects ``grammar``.

    Args:
        grammar: An llguidance grammar (``LLMatcher.grammar_from_*`` output, or Lark text).
        what: How to name the constraint in the message, e.g. ``"json_schema"``.
    """
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"structured output {what} is rejected by the grammar compiler: "
                         f"{'; '.join(m.strip() for m in messages)}")


@dataclass(frozen=True)
class StructuredOutput:
    """One constraint on a request's generated text; set exactly one field.

    Attributes:
        json_schema: A JSON schema (a dict, or its JSON text) the output must validate against.
        json_object: Any JSON object.
        regex: A regular expression (Rust ``regex`` syntax) the whole output must match.
        grammar: A Lark grammar in llguidance's dialect (``start`` is the root; a rule may be
            ``%json {schema}``).
        choice: The output is exactly one of these strings.
        strict: For JSON schemas: objects that list ``properties`` admit no others unless
            the schema allows them (see the module docstring); False follows JSON Schema's
            default, any other key allowed.

    Raises:
        ValueError: No field or several set, a field of the wrong type, or a constraint the
            grammar compiler rejects (its message says why).
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] | None = None  # a list is accepted and kept as a tuple
    strict: bool = True
    # The compiled llguidance grammar, filled in by __post_init__.
    compiled: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        given = [name for name, value in (("json_schema", self.json_schema),
                                          ("json_object", self.json_object or None),
                                          ("regex", self.regex), ("grammar", self.grammar),
                                          ("choice", self.choice)) if value is not None]
        if len(given) != 1:
            raise ValueError("StructuredOutput needs exactly one of json_schema, json_object, "
                             f"regex, grammar and choice; got {', '.join(given) or 'none'}")
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object={self.json_object!r} must be a bool")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict={self.strict!r} must be a bool")
        object.__setattr__(self, "compiled", self._compile(given[0]))

    @property
    def kind(self) -> str:
        """Which field is set: 'json_schema', 'json_object', 'regex', 'grammar' or 'choice'."""
        for name in ("json_schema", "regex", "grammar", "choice"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    def _compile(self, kind: str) -> str:
        from llguidance import LLMatcher

        if kind in ("json_schema", "json_object"):
            schema: Any = self.json_schema if kind == "json_schema" else {"type": "object"}
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"structured output json_schema is not valid JSON: {exc}"
                                     ) from None
            if not isinstance(schema, dict):
                raise ValueError(f"structured output json_schema must be a JSON object (a "
                                 f"dict), got {type(schema).__name__}")
            compiled = LLMatcher.grammar_from_json_schema(
                close_objects(schema) if self.strict else schema, defaults=COMPACT_JSON)
        elif kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError(f"structured output regex={self.regex!r} must be a non-empty str")
            compiled = LLMatcher.grammar_from_regex(self.regex)
        elif kind == "grammar":
            if not isinstance(self.grammar, str) or not self.grammar.strip():
                raise ValueError(f"structured output grammar={self.grammar!r} must be a non-empty "
                                 "Lark grammar")
            compiled = LLMatcher.grammar_from_lark(self.grammar)
        else:
            choices = self.choice
            if (isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices
                    or not all(isinstance(c, str) and c for c in choices)):
                raise ValueError(f"structured output choice={choices!r} must be a non-empty list "
                                 "of non-empty strings")
            compiled = LLMatcher.grammar_from_lark(
                "start: " + " | ".join(lark_string(c) for c in choices))
        check_grammar(compiled, kind)
        return compiled
