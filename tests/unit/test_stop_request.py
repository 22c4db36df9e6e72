"""How a stop or save request reaches a rank without Ray: a signal on the main thread, the STOP
file (with the driver's reason in it), and the data windows a run skips. The Ray paths (StopFlag
actor, driver signals, drains): tests/integration/test_stop.py and test_multinode_storage.py."""
from __future__ import annotations

import os
import signal
import time

import pytest

from sheepop.data.loader import data_step
from sheepop.driver.stop_forwarder import StopForwarder
from sheepop.train.stop import STOP, StopFlag, StopRequest


def test_first_signal_asks_for_a_stop_and_the_second_aborts(tmp_path):
    req = StopRequest(tmp_path)
    try:
        assert req.poll() == (None, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert req.poll() == ("SIGTERM received", None)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        req.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_stop_file_carries_the_drivers_reason(tmp_path):
    req = StopRequest(tmp_path)
    try:
        (tmp_path / "STOP").touch()
        assert req.poll() == ("run.dir/STOP exists", None)
        (tmp_path / "STOP").write_text("SIGTERM received by the driver\n")
        assert req.poll() == ("SIGTERM received by the driver", None)
    finally:
        req.close()


def test_flag_keeps_the_first_stop_reason_and_counts_saves():
    flag = StopFlag()
    flag.set("save", "node a is being drained")
    flag.set(STOP, "SIGTERM received by the driver")
    flag.set(STOP, "SIGINT received by the driver")
    flag.set("save", "node b is being drained")
    assert flag.get() == ("SIGTERM received by the driver", 2, "node b is being drained")


def test_driver_signal_writes_the_stop_file_and_queues_the_request(tmp_path):
    said = []
    with StopForwarder(tmp_path, flag=None, say=said.append, tick_s=60) as fwd:
        os.kill(os.getpid(), signal.SIGINT)
        assert (tmp_path / "STOP").read_text().strip() == "SIGINT received by the driver"
        assert fwd._pending == [(STOP, "SIGINT received by the driver")] and "SIGINT: stopping" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_skipped_steps_shift_the_data_windows_after_them():
    assert [data_step(i, []) for i in range(4)] == [0, 1, 2, 3]
    # Step 3's window (index 2) is never used: step 3 trains on step 4's, and so on.
    assert [data_step(i, [3]) for i in range(5)] == [0, 1, 3, 4, 5]
    assert [data_step(i, {4, 3}) for i in range(5)] == [0, 1, 4, 5, 6]
    assert [data_step(i, [1]) for i in range(2)] == [1, 2]


@pytest.mark.parametrize("writer", ["write_stop_file", "plain write_text"])
def test_a_rank_never_reads_the_drivers_stop_file_half_written(tmp_path, writer):
    """A rank polls run.dir/STOP while the driver writes it. A plain write_text creates the file
    empty before writing the reason, and a rank reading in between reported "run.dir/STOP exists"
    instead of the driver's signal (test_stop caught it once). The plain write is kept here to show
    the test sees that window."""
    import threading

    from sheepop.driver.stop_forwarder import write_stop_file

    reason = "SIGTERM received by the driver"
    seen: set = set()
    done = threading.Event()

    def rank():
        req = StopRequest(tmp_path)  # a thread of its own: no signal handlers, only the file
        while not done.is_set():
            seen.add(req.poll()[0])

    t = threading.Thread(target=rank)
    t.start()
    try:
        for _ in range(1000 if writer == "write_stop_file" else 20000):  # the plain write: seen within 1-5 here
            if writer == "write_stop_file":
                write_stop_file(tmp_path, reason)
            else:
                (tmp_path / "STOP").write_text(reason + "\n")
                if "run.dir/STOP exists" in seen:  # the window was seen: enough
                    break
            (tmp_path / "STOP").unlink()
        write_stop_file(tmp_path, reason)  # and left in place: the rank reads it whole
        deadline = time.monotonic() + 30
        while reason not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        t.join()
    assert reason in seen
    if writer == "write_stop_file":
        assert seen <= {None, reason}
    else:
        assert "run.dir/STOP exists" in seen
