"""Redaction: secrets registered with the logger never appear in a line; forgotten
ones (spent refresh tokens, long-replaced access tokens) free their slot."""

from __future__ import annotations

import io
import json

from tokend import logs


def test_registered_secrets_are_redacted_and_forgotten_ones_released() -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    spent, current = "spent-refresh-token-0001", "current-refresh-token-0002"
    logs.register_secret(spent)
    logs.register_secret(current)
    logs.forget_secret(spent)
    logs.get_logger().info("x", detail=f"saw {spent} and {current}", refresh_token=current)
    line = json.loads(out.getvalue())
    assert current not in out.getvalue()
    assert line["refresh_token"] == logs.REDACTED
    # A forgotten value is no longer held (nor matched) by the redactor.
    assert spent in line["detail"]
