"""The loss-spike detector's rules on synthetic loss curves (seeded, so every run sees the same noise)."""
from __future__ import annotations

import json
import math
import random

import pytest

from sheepop.train.spike import SpikeDetector

NAN, INF = float("nan"), float("inf")


def curve(steps: int = 300, seed: int = 0) -> list[float]:
    """A realistic loss curve: fast early drop from 7 towards 3, plus small Gaussian noise."""
    rng = random.Random(seed)
    return [3 + 4 * math.exp(-t / 60) + rng.gauss(0, 0.03) for t in range(steps)]


def feed(det: SpikeDetector, losses, grad_norm: float | None = 1.0) -> list[str | None]:
    return [det.check(loss, grad_norm) for loss in losses]


def test_a_smooth_noisy_curve_has_no_spike():
    for seed in range(3):
        assert feed(SpikeDetector(), curve(seed=seed)) == [None] * 300


def test_a_fifty_percent_jump_is_caught_and_named():
    losses = curve()
    det = SpikeDetector()
    assert feed(det, losses[:200]) == [None] * 200
    bad = losses[200] * 1.5
    why = det.check(bad, 1.0)
    assert why is not None
    assert f"loss {bad:.4g}" in why and "robust SDs above the median" in why and "last 50 steps" in why
    assert feed(det, losses[201:]) == [None] * 99  # the curve goes on as before


def test_a_jump_below_the_thresholds_is_not_a_spike():
    losses = curve()
    det = SpikeDetector()
    feed(det, losses[:200])
    assert det.check(losses[200] * 1.04, 1.0) is None  # under min_rel_jump (and within the noise)
    # min_rel_jump off: the z-score alone decides; a jump whose z is under the threshold passes
    det = SpikeDetector(min_rel_jump=0.0, z_threshold=50.0)
    feed(det, losses[:200])
    assert det.check(losses[200] * 1.5, 1.0) is None  # z is about 19 here
    assert det.check(losses[200] * 3.0, 1.0) is not None


def test_nothing_but_non_finite_values_is_called_before_min_history():
    det = SpikeDetector(min_history=5)
    assert feed(det, [7.0, 6.9, 6.8, 6.7]) == [None] * 4
    assert det.check(100.0, 1.0) is None  # only 4 good steps so far
    assert det.check(NAN, 1.0) == "loss is nan"
    assert det.check(6.6, INF) == "grad norm is inf"


def test_non_finite_loss_or_grad_norm_is_a_spike_at_once():
    assert SpikeDetector().check(NAN, 1.0) == "loss is nan"
    assert SpikeDetector().check(INF, None) == "loss is inf"
    assert SpikeDetector().check(-INF, 1.0) == "loss is -inf"
    # even with the grad-norm rule off (grad_z_threshold=0)
    assert SpikeDetector().check(3.0, INF) == "grad norm is inf"
    assert SpikeDetector().check(3.0, NAN) == "grad norm is nan"
    det = SpikeDetector(min_history=3)
    feed(det, [3.0, 3.0, 3.0])
    det.check(NAN, 1.0)
    assert det.state_dict()["losses"] == [3.0, 3.0, 3.0]  # never enters the history


def test_spikes_stay_out_of_the_history_so_a_run_of_them_is_caught():
    losses = curve()
    det = SpikeDetector()
    feed(det, losses[:200])
    before = det.state_dict()
    assert det.check(losses[200] * 1.5, 1.0) is not None
    assert det.check(losses[201] * 1.5, 1.0) is not None
    assert det.check(losses[202] * 1.6, 1.0) is not None
    assert det.state_dict() == before
    assert det.check(losses[203], 1.0) is None
    assert det.state_dict()["losses"][-1] == losses[203]


def test_grad_norm_rule_when_set_and_ignored_when_off_or_missing():
    rng = random.Random(1)
    losses = curve()[:100]
    norms = [1.0 + rng.gauss(0, 0.05) for _ in losses]
    det = SpikeDetector(grad_z_threshold=6.0)
    assert [det.check(loss, n) for loss, n in zip(losses, norms)] == [None] * 100
    why = det.check(losses[-1], 3.0)
    assert why is not None and why.startswith("grad norm 3 is ") and "robust SDs above the median 0.99" in why
    assert det.check(losses[-1], 1.02) is None
    assert det.check(losses[-1], None) is None  # no grad norm this step: the loss rule only

    off = SpikeDetector(grad_z_threshold=0.0)
    [off.check(loss, n) for loss, n in zip(losses, norms)]
    assert off.check(losses[-1], 3.0) is None
    assert off.state_dict()["grad_norms"][-1] == 3.0  # a good step: its grad norm is history


def test_grad_norm_history_needs_min_history_of_its_own():
    det = SpikeDetector(grad_z_threshold=6.0, min_history=5)
    feed(det, [3.0] * 20, grad_norm=None)  # plenty of loss history, no grad-norm history
    assert det.check(3.0, 1.0) is None
    assert det.check(3.0, 50.0) is None  # only one grad norm seen so far


def test_a_flat_history_neither_divides_by_zero_nor_calls_a_wobble_a_spike():
    det = SpikeDetector(min_history=5)
    feed(det, [4.0] * 20)
    assert det.check(4.0, 1.0) is None
    assert det.check(4.1, 1.0) is None  # z = 25 on the floored scale, but only 2.5% above the median
    why = det.check(4.4, 1.0)
    assert why is not None and "median 4 " in why  # 10% above: a spike
    strict = SpikeDetector(min_history=5, min_rel_jump=0.0)
    feed(strict, [4.0] * 20)
    assert strict.check(4.1, 1.0) is not None  # without the relative floor the wobble would count

    zeros = SpikeDetector(min_history=3)
    assert feed(zeros, [0.0] * 10) == [None] * 10
    assert zeros.check(0.0, 0.0) is None
    assert zeros.check(1.0, 0.0) is not None


def test_the_history_is_a_sliding_window():
    det = SpikeDetector(window=5, min_history=3)
    feed(det, [float(x) for x in range(10, 20)])
    assert det.state_dict()["losses"] == [15.0, 16.0, 17.0, 18.0, 19.0]


def test_state_dict_round_trip_gives_identical_decisions():
    losses = curve(seed=7)
    rest = losses[150:]
    for i in (20, 60, 61, 100):  # some spikes (one run of two) in what follows the checkpoint
        rest[i] *= 1.5
    kwargs = dict(grad_z_threshold=5.0, window=40, min_history=8)
    norms = [1.0 + 0.01 * (i % 7) for i in range(len(losses))]
    norms[150 + 30] = 4.0

    a = SpikeDetector(**kwargs)
    assert [a.check(loss, n) for loss, n in zip(losses[:150], norms)] == [None] * 150
    saved = json.loads(json.dumps(a.state_dict()))
    b = SpikeDetector(**kwargs)
    b.load_state_dict(saved)
    assert b.state_dict() == a.state_dict()

    out_a = [a.check(loss, n) for loss, n in zip(rest, norms[150:])]
    out_b = [b.check(loss, n) for loss, n in zip(rest, norms[150:])]
    assert out_a == out_b
    assert sum(why is not None for why in out_a) == 5


def test_load_state_dict_keeps_the_last_window_values():
    det = SpikeDetector(window=4, min_history=3)
    det.load_state_dict({"losses": [1, 2, 3, 4, 5, 6], "grad_norms": []})
    assert det.state_dict() == {"losses": [3.0, 4.0, 5.0, 6.0], "grad_norms": []}


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=2), "window=2"),
    (dict(window=2.5), "window=2.5"),
    (dict(min_history=2), "min_history=2"),
    (dict(window=20, min_history=21), "min_history=21, must be an integer in [3, window=20]"),
    (dict(z_threshold=0.0), "z_threshold=0.0"),
    (dict(z_threshold=NAN), "z_threshold=nan"),
    (dict(grad_z_threshold=-1.0), "grad_z_threshold=-1.0"),
    (dict(min_rel_jump=-0.01), "min_rel_jump=-0.01"),
])
def test_bad_parameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SpikeDetector(**kwargs)


def test_boundary_parameters_are_valid():
    SpikeDetector(window=3, min_history=3, grad_z_threshold=0.0, min_rel_jump=0.0)
