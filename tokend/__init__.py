"""tokend keeps OAuth 2.0 access tokens fresh for many accounts and hands them to
applications through files and a unix socket."""

from tokend._version import __version__

__all__ = ["__version__"]
