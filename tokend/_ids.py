"""User and group ids from names or numbers (for file ownership settings)."""

from __future__ import annotations

import grp
import pwd


def resolve_id(value: str | int | None, what: str, setting: str) -> int:
    """A uid or gid from a name or number; -1 (leave as is) for None."""
    if value is None:
        return -1
    if isinstance(value, bool):
        raise ValueError(f"{setting}: expected a {what} name or number, not {value!r}")
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        number = int(value)
        if number < 0:
            raise ValueError(f"{setting}: {what} id cannot be negative")
        return number
    try:
        if what == "user":
            return pwd.getpwnam(value).pw_uid
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"{setting}: unknown {what} {value!r}") from None
