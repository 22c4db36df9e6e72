"""The divergence guard's rules, step by step (the real diverging run: tests/integration/test_divergence.py)."""
from __future__ import annotations

import math

from sheepop.train.guard import DivergenceGuard

LN_V = math.log(1024)


def feed(guard, losses, norm=1.0):
    return [guard.check(loss, norm) for loss in losses]


def test_non_finite_loss_or_gradient_norm_stops_at_once():
    assert "loss is nan" in DivergenceGuard(1024).check(float("nan"), 1.0)
    g = DivergenceGuard(1024)
    assert g.check(6.9, 1.0) is None
    assert "gradient norm is inf" in g.check(6.8, float("inf"))
    assert DivergenceGuard(1024).check(6.9, None) is None  # no norm computed (no clipping): loss rules only


def test_collapse_to_uniform_after_learning_stops_after_patience():
    g = DivergenceGuard(1024, patience=3)
    assert feed(g, [6.9, 6.0, 5.0]) == [None] * 3
    out = feed(g, [LN_V, LN_V + 0.001, LN_V - 0.002])
    assert out[:2] == [None, None] and g.suspect
    assert "sits at ln(vocab) = 6.931" in out[2] and "for 3 steps" in out[2]


def test_a_run_that_starts_at_uniform_is_not_collapsed():
    g = DivergenceGuard(1024, patience=2)
    assert feed(g, [LN_V, LN_V, LN_V, LN_V]) == [None] * 4  # it never learned: nothing collapsed
    assert not g.suspect


def test_blow_up_far_above_the_start_stops_after_patience_and_recovery_resets():
    g = DivergenceGuard(1024, patience=3)
    assert feed(g, [6.95, 20.0, 30.0]) == [None, None, None] and g.suspect
    assert feed(g, [6.5]) == [None] and not g.suspect  # recovered: the count starts over
    out = feed(g, [50.0, 60.0, 70.0])
    assert out[:2] == [None, None] and "stays above 7.95" in out[2]


def test_ordinary_noise_is_not_divergence():
    g = DivergenceGuard(1024, patience=2)
    assert feed(g, [6.9, 6.5, 6.8, 6.2, 7.4, 6.0, 5.5, 5.9]) == [None] * 8
