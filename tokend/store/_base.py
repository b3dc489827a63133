from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from anyio.abc import TaskStatus

from tokend.model import StoredAccount


class StoreError(Exception):
    """The store could not durably complete an operation (disk full, I/O error, outage).

    The message never contains a secret.
    """


class StoreConflict(StoreError):
    """A compare-and-swap write lost: someone else wrote the record first."""


class Store(Protocol):
    """Durable per-account records with compare-and-swap writes.

    Every method may be slow (disk, network) but never blocks the event loop.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load_all(self) -> dict[str, StoredAccount]:
        """Every stored record, by account name."""
        ...

    async def load(self, account: str) -> StoredAccount | None: ...

    async def put(self, record: StoredAccount) -> StoredAccount:
        """Durably write ``record`` if the stored version still equals ``record.version``.

        Returns the record as stored (with its new version). Raises
        :class:`StoreConflict` if the version moved, :class:`StoreError` if the write
        could not be made durable; in both cases nothing was written.
        """
        ...

    async def delete(self, account: str) -> None: ...

    async def claim(self, account: str, owner: str, ttl: float) -> bool:
        """Try to hold the right to refresh ``account`` for ``ttl`` seconds.

        True if ``owner`` holds it now (newly or already). A single-process backend
        may always grant it; a shared backend grants it to one owner at a time.
        """
        ...

    async def release(self, account: str, owner: str) -> None: ...

    async def verify(self) -> str | None:
        """None while the store is sound; else why it is degraded (its file deleted or
        replaced under the running process, say). Cheap: the engine asks every second."""
        ...

    async def recreate(self) -> None:
        """Start over after :meth:`verify` reported a problem; the caller then writes
        every record it holds. A backend with nothing to recreate does nothing."""
        ...


@dataclass(frozen=True, slots=True)
class RecordWritten:
    """Another replica wrote ``record``."""

    record: StoredAccount


@dataclass(frozen=True, slots=True)
class AccountsAcquired:
    """This replica became the owner of ``accounts`` (joined, or took them over)."""

    accounts: tuple[str, ...]


StoreChange = RecordWritten | AccountsAcquired


@dataclass(frozen=True, slots=True)
class Ownership:
    """A shared store's view of the fleet, for metrics and status."""

    # This replica's id (as the other replicas and etcd name it).
    replica: str
    # Accounts this replica owns (refreshes) now.
    owned: int
    # Live replicas, this one included.
    replicas: int
    # Accounts this replica became the owner of since it started (joins, takeovers).
    acquired_total: int
    # Writes refused because ownership had moved (a lease that ran out).
    fenced_writes_total: int
    # Records written by other replicas and received through the watch.
    records_followed_total: int


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store that replicas share: each account is owned (refreshed) by one of them,
    and the others follow its writes."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Background work (leases, watches, ownership) until cancelled."""
        ...

    def changes(self) -> AsyncIterator[StoreChange]:
        """What other replicas wrote and what this one took over, in order."""
        ...

    def owned_elsewhere(self, account: str) -> bool:
        """Another live replica owns ``account`` (it refreshes it, this one follows)."""
        ...

    def owner_of(self, account: str) -> str | None:
        """The id of the replica that owns ``account`` now; None while nobody does."""
        ...

    def owns(self, account: str) -> bool:
        """This replica owns ``account`` (holds the right to refresh it)."""
        ...

    def ownership(self) -> Ownership:
        """Counts of what this replica owns and follows (cheap: read from memory)."""
        ...
