"""Host syncs only on steps that log (#13): between two logged steps the training loop reads
nothing back from the device, and what it logs equals a run that reads every step.

A CPU has no device to wait for, so the test counts what would be a sync on a GPU: every
`.item()`, `.tolist()`, `float()`, `int()` and `bool()` of a tensor made by sheepop's code (not
DeepSpeed's), tagged with the step the loop stood at. The counting wraps torch.Tensor's methods in
the training process; nothing is mocked, the run is a real in-process DeepSpeed run.
"""
import json
import sys
import subprocess
from pathlib import Path

from sheepop.monitor.metrics_file import read_metrics
from tests.helpers import CLI_TIMEOUT, ROOT, sheepop, tiny_overrides

COUNT_READS = r'''
import json, os, sys, atexit, torch
calls = []

def counted(orig):
    def wrapper(self, *a, **k):
        f = sys._getframe(1)
        if os.sep + "sheepop" + os.sep in f.f_code.co_filename:
            g = f
            while g is not None and not (g.f_code.co_name == "_train"
                                         and g.f_globals.get("__name__") == "sheepop.train.loop"):
                g = g.f_back
            if g is not None and "state" in g.f_locals:  # inside the loop: the step it stands at
                calls.append([g.f_locals["state"]["step"], os.path.basename(f.f_code.co_filename) + ":" + f.f_code.co_name])
        return orig(self, *a, **k)
    return wrapper

for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
atexit.register(lambda: open(os.environ["READS_OUT"], "w").write(json.dumps(calls)))
sys.argv = ["sheepop", *sys.argv[1:]]
from sheepop.cli import main
sys.exit(main())
'''

STEPS = ["trainer.max_steps=10", "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress=false"]


def losses(run: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["grad_norm"], r["tokens"]) for r in read_metrics(run) if "loss" in r}


def test_no_host_read_between_logged_steps_and_the_same_losses(tmp_path):
    reads = tmp_path / "reads.json"
    lagged = tmp_path / "every4"
    r = subprocess.run([sys.executable, "-c", COUNT_READS, "train",
                        *tiny_overrides(lagged, *STEPS, "trainer.log_every=4")],
                       capture_output=True, text=True, cwd=ROOT, timeout=CLI_TIMEOUT,
                       env={**__import__("os").environ, "READS_OUT": str(reads)})
    assert r.returncode == 0, r.stderr[-3000:]
    calls = json.loads(reads.read_text())
    read_steps = {0, 4, 8, 10}  # the evaluation before step 1, the logged steps, the last
    between = [(step, site) for step, site in calls if step not in read_steps]
    # The only read between logged steps is the previous step's stop/save flags, copied to host
    # memory a step earlier (on a GPU: a pinned buffer behind an event that has long fired).
    assert {site for _, site in between} == {"host_reads.py:pop"}, between
    # Steps 2-10 each read step 1-9's flags, before their own update: the loop stands at 1-9 then.
    assert sorted(step for step, _ in between) == [1, 2, 3, 5, 6, 7, 9]
    assert any(site == "host_reads.py:read" for step, site in calls if step == 4)  # the reads happen, batched

    # Reading late changes nothing: the logged steps equal a run that reads (and logs) every step.
    every = tmp_path / "every1"
    r = sheepop("train", *tiny_overrides(every, *STEPS, "trainer.log_every=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    some, all_steps = losses(lagged), losses(every)
    assert sorted(some) == [4, 8, 10] and sorted(all_steps) == list(range(1, 11))
    assert all(some[s] == all_steps[s] for s in some), (some, all_steps)
