"""Prometheus metrics (being built): the engine's observer and the /metrics renderer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokend.config import ServeConfig

if TYPE_CHECKING:
    from tokend.engine import Engine


class Metrics:
    """Collects tokend's series; :meth:`render` builds the exposition off the loop."""

    def __init__(self, engine: Engine, serve: ServeConfig) -> None:
        self.engine = engine
        self.serve = serve

    # Observer
    def refresh_finished(self, provider: str, outcome: str, duration: float) -> None:
        pass

    def store_committed(self, duration: float) -> None:
        pass

    def socket_request(self, endpoint: str, code: int) -> None:
        """Count one socket API request (``endpoint`` is a route name, not a path)."""

    async def render(self, accept_encoding: str | None = None) -> tuple[bytes, dict[str, str]]:
        """The exposition body and its response headers (Content-Type, maybe
        Content-Encoding: gzip when ``accept_encoding`` allows it)."""
        return b"", {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
