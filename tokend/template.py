"""Output templates: literal text and a fixed set of placeholders, nothing evaluated.

Shared by the config (so ``tokend check`` reports a bad template with its line) and
the token files publisher (which renders them).
"""

from __future__ import annotations

import string
from collections.abc import Mapping

PLACEHOLDERS = ("access_token", "token_type", "expires_at", "expires_in", "scope", "account")
_PLACEHOLDER_SET = frozenset(PLACEHOLDERS)


class Template:
    """An output template, checked once: literal text and known placeholders only."""

    __slots__ = ("_parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"{exc} (write {{{{ and }}}} for literal braces)") from None
        for literal, field, spec, conversion in parsed:
            if field is None:
                parts.append((literal, None))
                continue
            shown = (
                "{"
                + field
                + (f"!{conversion}" if conversion else "")
                + (f":{spec}" if spec else "")
                + "}"
            )
            if field not in _PLACEHOLDER_SET:
                raise ValueError(
                    f"placeholder {shown} is not allowed: use "
                    + ", ".join("{" + name + "}" for name in PLACEHOLDERS)
                    + " (no attribute or index access)"
                )
            if conversion is not None or spec:
                raise ValueError(
                    f"placeholder {shown}: conversions and format specs are not allowed"
                )
            parts.append((literal, field))
        self._parts = tuple(parts)

    def render(self, values: Mapping[str, str]) -> str:
        # Built by concatenation, never str.format: nothing in a template is evaluated.
        return "".join(
            literal + (values[field] if field is not None else "") for literal, field in self._parts
        )
