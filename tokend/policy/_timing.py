"""When to refresh: a pure function of a token's lifetime and the configured policy."""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokend.config import RefreshPolicyConfig


@dataclass(frozen=True, slots=True)
class RefreshTiming:
    """Resolved refresh-time settings (defaults filled in, overrides applied)."""

    at_fraction: float = 0.75
    jitter_fraction: float = 0.10
    min_margin: float = 60.0
    margin_fraction: float = 0.20
    default_lifetime: float = 3600.0

    def overlaid(self, layer: RefreshPolicyConfig) -> RefreshTiming:
        """These settings with every field ``layer`` sets taken from it."""
        changes = {k: v for k, v in layer.model_dump().items() if v is not None}
        return replace(self, **changes) if changes else self

    @classmethod
    def resolve(cls, *layers: RefreshPolicyConfig) -> RefreshTiming:
        """Defaults, then each layer in order (global, provider, account)."""
        timing = cls()
        for layer in layers:
            timing = timing.overlaid(layer)
        return timing


def refresh_at(timing: RefreshTiming, issued_at: float, expires_at: float, jitter: float) -> float:
    """The unix time at which to refresh a token issued at ``issued_at``.

    ``jitter`` is a number in [-1, 1] (drawn by the caller, so this stays pure): the
    refresh lands at ``at_fraction`` of the lifetime, moved by up to
    ``jitter_fraction`` of it, so many accounts issued together spread out. It is
    never later than ``expiry - max(min_margin, margin_fraction * lifetime)``; that
    margin is capped at half the lifetime so a token living less than two margins
    (say 90 s with a 60 s margin) is refreshed at half-life rather than at once, in a
    loop. Where that limit is what decides (short tokens), the jitter spreads the
    refreshes over the ``jitter_fraction`` of the lifetime just before it, so tokens
    issued together still do not come back together.
    """
    lifetime = max(0.0, expires_at - issued_at)
    jitter = min(1.0, max(-1.0, jitter))
    spread = timing.jitter_fraction * lifetime
    wanted = issued_at + lifetime * timing.at_fraction + spread * jitter
    margin = min(max(timing.min_margin, timing.margin_fraction * lifetime), lifetime / 2)
    latest = expires_at - margin
    if wanted > latest:
        # jitter -1 -> a whole spread early, +1 -> at the limit.
        wanted = latest - spread * (1.0 - jitter) / 2
    return max(issued_at, min(wanted, latest))
