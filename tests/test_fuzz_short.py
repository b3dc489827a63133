"""A short run of every fuzzing target (``python -m bench fuzz`` runs 100,000 cases
each): the socket request stream, config files, token endpoint responses and
discovery documents. Hypothesis, a few hundred cases per target."""

from __future__ import annotations

import pytest

from bench.fuzz import TARGETS, fuzz


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_short_run(target: str) -> None:
    tally = fuzz(target, cases=100, hang_after=5.0)
    assert tally.cases >= 100
    assert (tally.crashes, tally.hangs) == (0, 0), "\n".join(tally.examples)
