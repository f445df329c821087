"""JSON pointers (RFC 6901): into documents (``resolve``) and into their schemas (``resolve_pointer``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def pointer_tokens(pointer: str) -> list[str]:
    """RFC 6901 tokens of a JSON pointer (``/a~1b/c`` -> ``["a/b", "c"]``)."""
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""What ``resolve`` gives for a pointer naming nothing (distinct from a JSON null)."""


def resolve(doc: Any, tokens: Sequence[str]) -> Any:
    """The value at a JSON pointer's tokens in ``doc``, or MISSING: tokens name object members or,
    in arrays, indices written as RFC 6901 says (``0``, ``12``; not ``01`` nor ``-``)."""
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            node = node.get(token, MISSING)  # MISSING is neither dict nor list: the next token returns it
        elif (isinstance(node, list) and token.isascii() and token.isdigit() and (token[0] != "0" or token == "0")
              and int(token) < len(node)):
            node = node[int(token)]
        else:
            return MISSING
    return node


def resolve_pointer(schema: dict[str, Any], pointer: str) -> tuple[dict[str, Any] | None, str]:
    """The sub-schema a JSON pointer names, or None and why not."""
    node = schema
    for token in pointer_tokens(pointer):
        props = node.get("properties", {})
        if token not in props:
            return None, f"{pointer!r}: {token!r} is not a property of the schema"
        if token not in node.get("required", []):
            return None, f"{pointer!r}: property {token!r} must be required to be part of the key"
        node = props[token]
    return node, ""
