"""sheepop.train.host_reads: step values read in one batch, flags read one step late."""
import torch

from sheepop.train.host_reads import LaggedFlags, StepValues


def test_step_values_come_back_in_order_with_every_kind_of_grad_norm():
    values = StepValues()
    values.add(1, 0, 1e-3, torch.tensor(2.5), torch.tensor([0.75]), None)  # DeepSpeed: a tensor ...
    values.add(2, 1, 2e-3, torch.tensor(2.25), 0.5, 3.0)  # ... a float ...
    values.add(3, 3, 3e-3, torch.tensor(2.0), None, None)  # ... or None
    assert len(values) == 3
    rows = values.read()
    assert [(r.step, r.window, r.lr, r.loss, r.grad_norm, r.attended) for r in rows] == [
        (1, 0, 1e-3, 2.5, 0.75, None), (2, 1, 2e-3, 2.25, 0.5, 3.0), (3, 3, 3e-3, 2.0, None, None)]
    assert len(values) == 0 and values.read() == []  # each step is read once


def test_step_values_keep_the_value_of_their_step_not_a_later_one():
    values, loss = StepValues(), torch.tensor(1.0)
    values.add(1, 0, 0.0, loss, None, None)
    loss += 1  # the loop reuses buffers: the row must not follow them
    values.add(2, 1, 0.0, loss, None, None)
    assert [r.loss for r in values.read()] == [1.0, 2.0]


def test_lagged_flags_are_read_once_with_their_context():
    flags = LaggedFlags()
    assert flags.pop() is None  # nothing pushed yet: the first step reads nothing
    buf = torch.tensor([0.0, 1.0])
    flags.push(buf, ("why stop", None))
    buf.zero_()  # the next step's all-reduce reuses nothing pushed
    assert flags.pop() == ([0.0, 1.0], ("why stop", None))
    assert flags.pop() is None
