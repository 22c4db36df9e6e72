"""The loop's say over an update (sheepop.train.update_gate): a skipped step changes neither the
weights, nor Adam's moments, nor the schedule; a lowered rate applies at once and only for its
window; the gate never goes into a checkpoint. DeepSpeed's wrappers at each ZeRO stage call these
client objects: tests/integration/test_spike_rollback.py runs the gate inside real engines."""
from __future__ import annotations

import copy

import torch

from sheepop.train.update_gate import GatedAdamW, GatedLambdaLR, UpdateGate


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    gate = UpdateGate()
    opt = GatedAdamW(model.parameters(), gate, lr=0.1, weight_decay=0.1)
    sched = GatedLambdaLR(opt, lambda s: 1.0 / (s + 1), gate)
    return model, gate, opt, sched


def train_step(model, opt, sched, seed: int) -> None:
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()


def test_a_skipped_step_changes_nothing_and_the_next_one_is_as_if_it_never_was():
    model, gate, opt, sched = setup()
    train_step(model, opt, sched, seed=1)
    twin = copy.deepcopy((model, opt.state_dict(), sched.state_dict()))
    weights, state, epoch = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.last_epoch

    gate.skip = True
    train_step(model, opt, sched, seed=99)  # a spike's gradients
    gate.skip = False
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert sched.last_epoch == epoch and sched.get_last_lr() == [0.1 / (epoch + 1)]
    after = opt.state_dict()["state"]
    for i, s in state["state"].items():
        assert all(torch.equal(s[k], after[i][k]) for k in s)  # moments and Adam's step count

    # ...so the next step equals a twin's that never saw the skipped one
    twin_model, twin_opt_state, twin_sched_state = twin
    twin_gate = UpdateGate()
    twin_opt = GatedAdamW(twin_model.parameters(), twin_gate, lr=0.1, weight_decay=0.1)
    twin_sched = GatedLambdaLR(twin_opt, lambda s: 1.0 / (s + 1), twin_gate)
    twin_opt.load_state_dict(twin_opt_state)  # after the scheduler, whose first step sets the rate
    twin_sched.load_state_dict(twin_sched_state)
    train_step(model, opt, sched, seed=2)
    train_step(twin_model, twin_opt, twin_sched, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin_model.state_dict().values()))


def test_a_lowered_rate_applies_at_once_and_only_inside_its_window():
    model, gate, opt, sched = setup()
    train_step(model, opt, sched, seed=1)  # last_epoch 1: rate 0.1 / 2
    gate.lr_scale, gate.lr_scale_until = 0.25, 3
    sched.refresh()
    assert sched.get_last_lr() == [0.1 / 2 * 0.25] and opt.param_groups[0]["lr"] == 0.1 / 2 * 0.25
    train_step(model, opt, sched, seed=2)  # schedule step 2: still inside the window
    assert sched.get_last_lr() == [0.1 / 3 * 0.25]
    train_step(model, opt, sched, seed=3)  # schedule step 3: the window is over
    assert sched.get_last_lr() == [0.1 / 4]


def test_the_gate_stays_out_of_the_scheduler_state_and_survives_a_load():
    model, gate, opt, sched = setup()
    gate.lr_scale, gate.lr_scale_until = 0.5, 10
    saved = sched.state_dict()
    assert "gate" not in saved
    torch.save(saved, buf := __import__("io").BytesIO())  # what DeepSpeed's checkpoint does with it
    other_gate = UpdateGate()
    other = GatedLambdaLR(GatedAdamW(model.parameters(), other_gate, lr=0.1), lambda s: 1.0, other_gate)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    assert other.gate is other_gate
