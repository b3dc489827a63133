"""The HTTP servers (being built): the token API on a unix socket, and the TCP
listener for Prometheus and probes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

from tokend.config import Config

if TYPE_CHECKING:
    from tokend.engine import Engine
    from tokend.publish.metrics import Metrics


async def serve_socket(
    engine: Engine,
    config: Config,
    metrics: Metrics,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the token API on ``config.serve.socket`` until cancelled."""
    task_status.started()
    await anyio.sleep_forever()


async def serve_tcp(
    engine: Engine,
    config: Config,
    metrics: Metrics,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics, /healthz and /readyz on ``config.serve.metrics_listen``."""
    task_status.started()
    await anyio.sleep_forever()
