"""Where metrics go: metrics.jsonl (always) and W&B (logger=wandb), both on rank 0 only.

metrics.jsonl is the run's source of truth: one JSON object per logged step (`step`, `loss`,
`lr`, `grad_norm`, `tokens`, `tokens_per_sec`, ...; eval lines add `val_loss`, `val_ppl`) and
`event` lines (start, resume, stop, end). The live view, `sheepop watch`, the loss plot and the
report all read it, so they work without W&B.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from sheepop.config import redact

# metrics.jsonl key → W&B key
WANDB_KEYS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "step_time": "perf/step_time",
    "mem_allocated": "sys/mem_allocated", "val_loss": "val/loss", "val_ppl": "val/ppl",
}


def wandb_mode(mode: str) -> str:
    """auto → online when a W&B key is configured (env or netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


class MetricsSink:
    """Rank 0 writes; other ranks get a sink that drops everything."""

    def __init__(self, cfg: dict, rank: int, wandb_id: str | None = None):
        self.active = rank == 0
        self.run_dir = Path(cfg["run"]["dir"])
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self._last_wandb_step = -1
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: watchers see each line
        lg = cfg["logger"]
        if lg["kind"] == "wandb" and wandb_mode(lg["mode"]) != "disabled":
            self._start_wandb(cfg, lg)

    def _start_wandb(self, cfg: dict, lg: dict) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb_id = self.wandb_id or uuid.uuid4().hex[:8]
        self.wandb = wandb.init(
            id=self.wandb_id, resume="allow", mode=wandb_mode(lg["mode"]),
            project=lg["project"], entity=lg.get("entity"), group=lg.get("group"),
            tags=list(lg.get("tags") or []), name=cfg["run"]["name"], dir=str(self.run_dir),
            config=redact(cfg),
        )
        # A resumed run continues where W&B's history stops; steps never go backwards.
        self._last_wandb_step = max(-1, int(getattr(self.wandb, "step", 0) or 0) - 1)

    def log(self, row: dict) -> None:
        if not self.active:
            return
        row = {"time": round(time.time(), 3), **row}
        self._file.write(json.dumps(row) + "\n")
        step = row.get("step")
        if self.wandb is not None and step is not None and "event" not in row:
            data = {WANDB_KEYS[k]: v for k, v in row.items() if k in WANDB_KEYS and v is not None}
            if step > self._last_wandb_step and data:
                self.wandb.log(data, step=step)
                self._last_wandb_step = step

    def event(self, name: str, **fields) -> None:
        self.log({"event": name, **fields})

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows


def latest_per_step(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for `key`; after a restart the re-run steps replace the earlier ones."""
    by_step: dict[int, float] = {}
    for r in rows:
        if "event" not in r and r.get(key) is not None:
            by_step[r["step"]] = r[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def step_extras(*, flops_per_token: float, tokens_per_sec: float, world_size: int, device) -> dict:
    """Extra per-step fields (MFU, memory). Called on every rank (collectives allowed)."""
    return {}


def eval_extras(*, engine, cfg: dict, step: int, rank: int, sink: "MetricsSink") -> None:
    """Called on every rank after each evaluation (e.g. to log generated samples; under ZeRO-3 all
    ranks must take part in gathering parameters)."""
    return None
