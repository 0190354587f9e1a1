"""How many round lines a run prints: every round of a short run; about
PROGRESS_LINES of a long one, always with the first, the last and every round with news."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from server.coordinator import PROGRESS_LINES, shows_round


def test_a_short_run_shows_every_round():
    rounds = 2 * PROGRESS_LINES
    assert all(shows_round(r, rounds) for r in range(1, rounds + 1))


def test_the_default_run_keeps_its_validation_rounds_and_stays_short():
    rounds, validated = 80, {21, 41, 61}  # validate_every 20: the model after round 20 is read in round 21
    shown = [r for r in range(1, rounds + 1) if shows_round(r, rounds, noteworthy=r in validated)]
    assert shown[0] == 1 and shown[-1] == rounds and validated <= set(shown)
    assert len(shown) <= PROGRESS_LINES + 1 + len(validated)


@given(rounds=st.integers(1, 5000), news=st.sets(st.integers(1, 5000), max_size=30))
def test_a_long_run_prints_about_progress_lines_and_never_goes_quiet_for_long(rounds, news):
    news = {r for r in news if r <= rounds}
    shown = [r for r in range(1, rounds + 1) if shows_round(r, rounds, noteworthy=r in news)]
    assert shown[0] == 1 and shown[-1] == rounds and news <= set(shown)
    assert len(shown) <= max(2 * PROGRESS_LINES, PROGRESS_LINES + 2) + len(news)
    every = 1 if rounds <= 2 * PROGRESS_LINES else math.ceil(rounds / PROGRESS_LINES)
    assert all(b - a <= every for a, b in zip(shown, shown[1:]))
