"""Everything that hands tokens out: token files, the socket server, metrics.

Publishers read the engine's view; the engine tells them, after a token is durably
committed, that it changed (:class:`Publisher`)."""

from tokend.publish._base import Publisher
from tokend.publish.files import TokenFiles

__all__ = ["Publisher", "TokenFiles"]
