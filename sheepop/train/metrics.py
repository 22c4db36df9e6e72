"""Where metrics go: metrics.jsonl (always) and W&B (logger=wandb), both on rank 0 only.

metrics.jsonl is the run's source of truth (sheepop.monitor.metrics_file reads it): one JSON object per logged step (`step`, `loss`,
`lr`, `grad_norm`, `tokens`, `tokens_per_sec`, `step_time`, `mfu`, `peak_flops`, `mem_allocated`
(GiB, max over ranks); eval lines add `val_loss`, `val_ppl`; with data.mixture every line adds
`tokens/<source>` and eval lines `val_loss/<source>`) and `event` lines (start, resume,
checkpoint, samples, stop, end). The live view, `sheepop watch`, the plots and the report all
read it, so they work without W&B.

W&B: one run per training job. Its id lives in every checkpoint's meta.json, so a resume (by
hand, or Ray's restart after a worker failure) reopens the same run; steps already logged are
not sent again, so W&B's step never goes backwards.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from sheepop import perf, storage
from sheepop.config import Config, redact, wandb_mode
from sheepop.errors import UserError

# metrics.jsonl key → W&B key
WANDB_KEYS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
    "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu", "step_time": "perf/step_time",
    "mem_allocated": "sys/mem_allocated", "val_loss": "val/loss", "val_ppl": "val/ppl",
}
# data.mixture: per-source keys, metrics.jsonl prefix → W&B prefix (tokens/<name>, val_loss/<name>)
WANDB_PREFIXES = {"tokens/": "data/tokens/", "val_loss/": "val/loss/"}


def wandb_key(key: str) -> str | None:
    """The W&B name of a metrics.jsonl key (None: not sent)."""
    if key in WANDB_KEYS:
        return WANDB_KEYS[key]
    for prefix, to in WANDB_PREFIXES.items():
        if key.startswith(prefix):
            return to + key[len(prefix):]
    return None


WANDB_ID_FILE = "wandb_id"  # in run.dir: the W&B run this run dir logs to


class _Mirror:
    """Copies metrics.jsonl to the run's storage (cluster.storage_path/<run.name>/) as the run goes,
    so `sheepop watch|report` can follow a run from any machine: at most every MIRROR_EVERY_S
    (at once for events), in a background thread, and a last time at close."""

    MIRROR_EVERY_S = 15.0

    def __init__(self, path: Path, cfg: Config):
        from sheepop.train.checkpoint_files import run_storage

        self.path = path
        self.target = storage.join(run_storage(cfg), path.name) if cfg.cluster.storage_path else None
        self._last = 0.0
        self._thread: threading.Thread | None = None
        # A resume on a machine that has not seen this run (another node, a deleted run.dir) continues
        # the file in storage rather than replacing it with only the new lines.
        if self.target is not None and not path.exists() and storage.is_file(self.target):
            path.write_bytes(storage.read_bytes(self.target))

    def maybe(self, force: bool = False) -> None:
        now = time.time()
        if self.target is None or (not force and now - self._last < self.MIRROR_EVERY_S):
            return
        if self._thread is not None and self._thread.is_alive():
            return  # the previous copy is still going: the next call sends a newer file
        self._last = now
        self._thread = threading.Thread(target=self._copy, name="mirror-metrics", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            storage.write_bytes(self.target, self.path.read_bytes())
        except OSError:
            pass  # storage hiccup: the next copy (or the last one at close) carries it

    def close(self) -> None:
        if self.target is None:
            return
        if self._thread is not None:
            self._thread.join()
        self._copy()


class MetricsSink:
    """Rank 0 writes; other ranks get a sink that drops everything."""

    def __init__(self, cfg: Config, rank: int, wandb_id: str | None = None, attempt: int = 0):
        self.active = rank == 0
        self.attempt = attempt  # which start of the run wrote a line (0 = the first; +1 per resume or restart)
        self.run_dir = Path(cfg.run.dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.wandb_id = wandb_id
        self._last_wandb_step = -1
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._mirror = _Mirror(self.path, cfg)  # first: it brings back the lines a resumed run logged elsewhere
        self._file = open(self.path, "a", buffering=1)  # line-buffered: watchers see each line
        lg = cfg.logger
        if lg.kind == "wandb" and wandb_mode(lg.mode) != "disabled":
            self._start_wandb(cfg, lg)

    def _start_wandb(self, cfg: Config, lg) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # The id comes from the checkpoint; a run that died before its first checkpoint finds it
        # beside metrics.jsonl, so its restart continues the same W&B run (as metrics.jsonl does).
        id_file = self.run_dir / WANDB_ID_FILE
        if self.wandb_id is None and id_file.is_file():
            self.wandb_id = id_file.read_text().strip() or None
        self.wandb_id = self.wandb_id or uuid.uuid4().hex[:8]
        id_file.write_text(self.wandb_id)
        mode = wandb_mode(lg.mode)
        try:
            self.wandb = wandb.init(
                id=self.wandb_id, resume="allow", mode=mode,
                project=lg.project, entity=lg.entity, group=lg.group,
                tags=list(lg.tags or []), name=cfg.run.name, dir=str(self.run_dir),
                config=redact(cfg),
            )
        except Exception as e:  # wandb raises CommError, UsageError, AuthenticationError, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"W&B ({mode}) did not start: {first}; logger.mode=offline logs to run.dir/wandb "
                            f"(wandb sync uploads it later), logger=none turns W&B off") from None
        # Steps only go forward in a W&B run. Online, W&B tells where the resumed run's history
        # stops, and steps re-run after a failure (since the last checkpoint) are not sent twice.
        # Offline, each process writes its own file and cannot know what an earlier one holds (a
        # killed process may not have flushed it), so it logs every step it computes; when the
        # files are synced, W&B keeps the first copy of a step.
        self._last_wandb_step = max(-1, int(getattr(self.wandb, "step", 0) or 0) - 1)
        self._pending: dict = {}  # W&B-only data (sample tables) waiting for its step's metrics

    def log(self, row: dict) -> None:
        if not self.active:
            return
        row = {"time": round(time.time(), 3), "attempt": self.attempt, **row}
        self._file.write(json.dumps(row) + "\n")
        self._mirror.maybe(force="event" in row)
        step = row.get("step")
        if self.wandb is not None and step is not None and "event" not in row:
            data = {wandb_key(k): v for k, v in row.items() if wandb_key(k) and v is not None}
            self._wandb_log(data, step)

    def _wandb_log(self, data: dict, step: int) -> None:
        if self._pending and self._pending_step != step:
            self._flush_pending()
        if self._pending:
            data = {**self._pending, **data}
            self._pending = {}
        if step > self._last_wandb_step and data:
            self.wandb.log(data, step=step)
            self._last_wandb_step = step

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        if pending and self._pending_step > self._last_wandb_step:
            self.wandb.log(pending, step=self._pending_step)
            self._last_wandb_step = self._pending_step

    def samples(self, step: int, rows: list[dict]) -> None:
        """Generated text at an eval: a `samples` event in metrics.jsonl, a table in W&B (all
        evals so far, so the newest table shows how the samples changed)."""
        if not self.active:
            return
        self.event("samples", step=step, samples=rows)
        if self.wandb is not None:
            import wandb

            self._sample_rows = getattr(self, "_sample_rows", []) + [[step, r["prompt"], r["text"]] for r in rows]
            # Sent with this step's metrics (logged right after the eval), not as a step of its own.
            self._pending, self._pending_step = {"samples": wandb.Table(columns=["step", "prompt", "text"],
                                                                         data=self._sample_rows)}, step

    def task_scores(self, result: dict) -> None:
        """A finished trainer.eval_tasks evaluation (sheepop.train.task_eval): a `tasks` event with the
        scores of the checkpoint's step, or `tasks_failed` with the reason. W&B gets the scores as
        tasks/<task>/<metric> plotted against tasks/step (its own step has moved on since the save)."""
        if "error" in result:
            self.event("tasks_failed", step=result["step"], reason=result["error"])
            return
        self.event("tasks", step=result["step"], scores=result["scores"], seconds=result.get("seconds"))
        if self.active and self.wandb is not None:
            self.wandb.define_metric("tasks/*", step_metric="tasks/step")
            self.wandb.log({**result["scores"], "tasks/step": result["step"]}, step=max(0, self._last_wandb_step))

    def event(self, name: str, **fields) -> None:
        self.log({"event": name, **fields})
        if self.active and self.wandb is not None and name in ("start", "resume"):
            # The job's shape (world size, batch, FLOPs/token, precision) next to the config.
            facts = {k: v for k, v in fields.items() if k not in ("step", "checkpoint") and v is not None}
            self.wandb.config.update({"job": facts}, allow_val_change=True)

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        self._mirror.close()
        if self.wandb is not None:
            self._flush_pending()
            self.wandb.finish()


def step_extras(*, flops_per_token: float, tokens_per_sec: float, world_size: int, device,
                precision=None) -> dict:
    """MFU and memory for this step. Called on every rank (all take part in the max over ranks).

    tokens_per_sec counts the whole job's tokens, so MFU divides by every rank's peak.
    precision: the dtype matmuls run in (None = fp32), which picks the bf16 or the fp32 peak.
    """
    device = torch.device(device)
    peak, _ = perf.peak_flops(device, precision)
    achieved = flops_per_token * tokens_per_sec / world_size  # per rank
    if device.type == "cpu" and peak and achieved > peak:  # the cached probe ran on a busy machine
        peak = perf.raise_cpu_peak(perf.is_half(precision), achieved)
    if device.type == "cuda":  # the step's peak: what decides an out-of-memory
        mem = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:  # CPU tensors are not tracked by an allocator: the process's resident memory
        import psutil

        mem = psutil.Process().memory_info().rss
    mem_gib = torch.tensor(mem / 2**30, dtype=torch.float64, device=device)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(mem_gib, op=dist.ReduceOp.MAX)
    return {"mfu": perf.mfu(flops_per_token, tokens_per_sec, peak, world_size), "peak_flops": peak,
            "mem_allocated": round(mem_gib.item(), 4)}


SAMPLE_PROMPTS = ("import ", "class ")  # besides trainer.sample_prompt: code, as the default corpus is
SAMPLE_TOKENS = 32  # per prompt and eval: enough to read, cheap next to an eval pass
_tokenizers: dict = {}


def eval_extras(*, engine, cfg: Config, step: int, rank: int, sink: "MetricsSink", tokenizer: Path) -> None:
    """Generated samples after each evaluation. Every rank generates (under ZeRO-3 each forward
    gathers parameters from all ranks, so all must run the same forwards: no early stop at
    <|endoftext|>, a fixed number of tokens); rank 0 logs them."""
    from sheepop.model.generate import generate

    tok_path = Path(tokenizer)
    if tok_path not in _tokenizers:
        from tokenizers import Tokenizer

        _tokenizers[tok_path] = Tokenizer.from_file(str(tok_path))
    tok = _tokenizers[tok_path]
    t = cfg.trainer
    prompts = list(dict.fromkeys([t.sample_prompt, *SAMPLE_PROMPTS]))
    ids = [tok.encode(p).ids or [0] for p in prompts]
    model = engine.module
    n = min(t.sample_tokens, SAMPLE_TOKENS, model.args.max_seq_len - max(map(len, ids)) - 1)
    if n < 1:
        return
    was_training = model.training
    out = generate(model, ids, n, temperature=0.8, top_k=40, seed=cfg.run.seed)
    model.train(was_training)
    eot = tok.token_to_id(cfg.tokenizer.eot)
    rows = [{"prompt": p, "text": p + tok.decode(o[: o.index(eot)] if eot in o else o)} for p, o in zip(prompts, out)]
    sink.samples(step, rows)
