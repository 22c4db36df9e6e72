"""Run a per-item function over a list, in this process or on Ray Data workers.

data.num_workers=1 runs in-process: no Ray start-up (2-3 s), which keeps the default
`sheepop train` fast. data.num_workers>=2 maps the same function with Ray Data on an actor
pool of that size, on a fresh local Ray (cluster=process|local) or the cluster named by
cluster.address (cluster=ray), or on the Ray this process is already connected to.

Results are yielded as they finish, each with its item's index: callers put them back in
order, which is what makes the output independent of the number of workers.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Callable, Iterator

import numpy as np

# Each Ray worker gets one core's worth of threads: `num_workers` then means cores, and the
# Rust tokenizer's thread pool does not multiply across workers.
WORKER_ENV = {"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}


class _Apply:
    """Ray Data UDF: builds the function once per actor (e.g. loads a tokenizer), then maps rows."""

    def __init__(self, factory: Callable[[], Callable]):
        self.fn = factory()

    def __call__(self, batch: dict) -> dict:
        outs = [pickle.dumps(self.fn(pickle.loads(p)), protocol=5) for p in batch["payload"]]
        return {"k": np.asarray(batch["k"]), "out": np.array(outs, dtype=object)}


class Executor:
    """`map(factory, items)` → (index, result) pairs; factory() returns the per-item function."""

    def __init__(self, num_workers: int, cluster_cfg: dict | None = None):
        self.num_workers = max(1, int(num_workers))
        self.cluster_cfg = cluster_cfg or {}
        self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def map(self, factory: Callable[[], Callable], items: list, batch_size: int = 1) -> Iterator[tuple[int, object]]:
        if not items:
            return
        if self.num_workers == 1:
            fn = factory()
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        yield from self._ray_map(factory, items, batch_size)

    def _ray(self):
        import ray

        if not ray.is_initialized():
            from sheepop import compat

            compat.ray_local_env()
            c = self.cluster_cfg
            if c.get("kind") == "ray":
                ray.init(address=c.get("address") or os.environ.get("RAY_ADDRESS", "auto"), logging_level="WARNING")
            else:
                cpus = c.get("num_cpus") or max(os.cpu_count() or 1, self.num_workers)
                env = compat.ray_loopback_only()
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         runtime_env={"env_vars": env} if env else None, logging_level="WARNING",
                         configure_logging=True)
            self._started = True
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the pipeline draws its own, per stage
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        return ray

    def _ray_map(self, factory, items, batch_size):
        ray = self._ray()
        rows = [{"k": i, "payload": pickle.dumps(item, protocol=5)} for i, item in enumerate(items)]
        blocks = min(len(rows), self.num_workers * 8)
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            _Apply, fn_constructor_kwargs={"factory": factory}, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.num_workers), num_cpus=1,
            runtime_env={"env_vars": WORKER_ENV})
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, out in zip(batch["k"], batch["out"]):
                yield int(k), pickle.loads(out)
