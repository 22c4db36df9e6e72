"""The training loop: the same function on every rank, for every world size.

`train(plan)` takes the driver's RunPlan (typed config, batch plan, resume point, data
manifest). The driver calls it in-process (one rank, no Ray) or as Ray Train's
`train_loop_per_worker` on N workers; the only difference is `report`, which hands checkpoints
to Ray Train when Ray is there. A rank checks the plan against what it finds (world size, the
prepared data on its node) and never decides any of it again.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from sheepop import startup
from sheepop.cpu_allocator import heap_only, hugepages_on, keep_freed_memory
from sheepop.data.loader import MixtureWindows, TokenWindows, data_step, document_ids
from sheepop.data.shards import verify_prepared
from sheepop.errors import UserError
from sheepop.logs import library_logger_to, logs_dir
from sheepop.model.transformer import Transformer, document_attended, flops_per_token
from sheepop.train import checkpoint, checkpoint_files, engine as eng, restart
from sheepop.train.guard import DivergenceGuard
from sheepop.train.host_reads import LaggedFlags, StepValue, StepValues
from sheepop.train.profile import StepProfiler
from sheepop.train.metrics import MetricsSink, eval_extras, step_extras
from sheepop.train.run_plan import RunPlan
from sheepop.train.spike import SpikeDetector
from sheepop.train.stop import StopRequest
from sheepop.train.task_eval import TaskEval
from sheepop.train.watchdog import HangWatchdog

def train(plan: RunPlan, report=None, restored: str | None = None) -> dict:
    """Train to trainer.max_steps (or a stop request); returns the last metrics of this rank.

    report(dir, name): Ray Train's checkpoint hand-off (None without Ray).
    restored: the checkpoint Ray Train hands a restarted worker group. With Ray, rank 0 picks the
    checkpoint to continue from (sheepop.train.restart); it replaces plan.resume.
    """
    keep_freed_memory()  # this process trains: what a step frees stays for the next (sheepop.cpu_allocator)
    startup.mark("worker")  # this rank's process is up and has imported torch, DeepSpeed and the loop
    if plan.startup.get("launch") != (began := startup.process_start()):  # a Ray worker: its own process
        startup.marks_add("worker_process", began)
    rank, world = eng.init_distributed()
    startup.mark("distributed")
    t_cfg = plan.cfg.trainer
    watchdog = HangWatchdog(rank=rank, run_dir=Path(plan.cfg.run.dir), attempt=0, timeout_s=t_cfg.hang_timeout_s,
                            init_timeout_s=t_cfg.hang_init_timeout_s, save_timeout_s=t_cfg.hang_init_timeout_s)
    watchdog.beat("init", 0)
    try:
        return _train(plan, rank, world, watchdog, report, restored)
    finally:
        watchdog.close()


def _train(plan: RunPlan, rank: int, world: int, watchdog: HangWatchdog, report, restored: str | None) -> dict:
    cfg, batch = plan.cfg, plan.batch_for(world)
    t_cfg = cfg.trainer
    run_dir = Path(cfg.run.dir)
    library_logger_to(eng.ds_logger, logs_dir(run_dir) / f"rank{rank}.log")  # not the terminal
    seed = cfg.run.seed
    # The prepared data on this node (a verified local copy when data.out_dir is in storage).
    if plan.mixture:  # data.mixture: every source checked on this node as a single corpus is
        data_dirs = [verify_prepared(s.out_dir, s.manifest, where=socket.gethostname()) for s in plan.mixture]
        data_dir = data_dirs[0]  # its tokenizer.json is every source's
    else:
        data_dir = verify_prepared(cfg.data.out_dir, plan.manifest, where=socket.gethostname())
    startup.mark("data_verified")
    manifest = plan.manifest
    micro, accum, seq = batch.micro_batch_size, batch.grad_accum_steps, batch.seq_len
    amp = eng.autocast_dtype(t_cfg.precision)  # bf16-autocast only; DeepSpeed's bf16 mode casts the module itself
    compute = eng.compute_dtype(t_cfg.precision)  # what matmuls run in: picks the peak for MFU
    device = eng.device()

    torch.manual_seed(seed)  # same init on every rank
    args = cfg.model
    model = Transformer(args)
    ray_recorded = restored
    if report is not None:  # Ray Train started this group: a restart continues from the newest checkpoint
        restored = restart.continue_from(checkpoint.root(cfg), plan.launch, restored, plan.resume, rank)
    resume_dir = restored or plan.resume
    if resume_dir is None and plan.init_from:  # a fresh start from imported weights (a resume has trained ones)
        checkpoint.load_hf(model, plan.init_from)
    universal = plan.universal if restored is None else _restored_universal(restored, rank, world, cfg)
    engine = eng.build(model, cfg, batch, load_universal=universal is not None)
    startup.mark("engine")
    state = {"step": 0, "tokens": 0, "wandb_id": None, "attempt": 0, "rollbacks": 0,
             "skip_steps": sorted(set(t_cfg.skip_steps)), "spike": {}, "lr_scale_until": 0}
    if resume_dir is not None:
        state.update(_merged(checkpoint.load(engine, resume_dir, rank, universal), state))
        state["attempt"] = state.get("attempt", 0) + 1
        startup.mark("checkpoint_loaded")
    state["launch"] = plan.launch  # in every checkpoint this launch saves (sheepop.train.restart)
    watchdog.attempt = state["attempt"]
    good = (resume_dir, universal)  # the checkpoint a rollback returns to (saved by a healthy model)
    uploads = checkpoint.Uploads() if report is None else None  # Ray Train uploads when it is there

    if plan.mixture:  # each window's source drawn by weight; a fixed validation set per source
        train_data = MixtureWindows([TokenWindows(d, s.manifest, "train", seq) for d, s in zip(data_dirs, plan.mixture)],
                                    [s.weight for s in plan.mixture])
        val_sets = [(s.name, s.weight, TokenWindows(d, s.manifest, "val", seq)) for d, s in zip(data_dirs, plan.mixture)]
        val_data = val_sets[0][2]  # the end-of-run probe's batch
        # Tokens each source gave to the steps trained so far: in every checkpoint's meta.json, so
        # resumes, restarts and rollbacks continue (or go back to) the exact counts.
        seen = state.get("source_tokens") or {}
        state["source_tokens"] = {s.name: int(seen.get(s.name, 0)) for s in plan.mixture}
    else:
        train_data = TokenWindows(data_dir, manifest, "train", seq)
        val_data = TokenWindows(data_dir, manifest, "val", seq)
        val_sets = []
    sink = MetricsSink(cfg, rank, state.get("wandb_id"), attempt=state["attempt"])
    watchdog.on_hang = lambda info: sink.event("hang", **info)  # rank 0's names the slow rank(s)
    state["wandb_id"] = sink.wandb_id
    tasks = TaskEval(cfg, rank, run_dir)  # trainer.eval_tasks, scored beside training on rank 0
    stop = StopRequest(run_dir, plan.stop_channel, rank)
    fpt = flops_per_token(args, seq)
    # data.document_mask: each forward gets doc_ids (nothing when off: today's call, unchanged)
    eot = manifest["tokenizer"]["eot_id"] if cfg.data.document_mask else None
    docs = (lambda x: {"doc_ids": document_ids(x, eot).to(device)}) if eot is not None else (lambda x: {})
    guard = DivergenceGuard(args.vocab_size)
    spikes = SpikeDetector(window=t_cfg.spike_window, min_history=t_cfg.spike_min_history, z_threshold=t_cfg.spike_z)
    spikes.load_state_dict(state["spike"])
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    def evaluate() -> dict:
        """val_loss and val_ppl; with a data mixture also val_loss/<source> on each source's own
        validation set, and val_loss is their mean by the mixture's weights."""
        engine.eval()
        sets = val_sets or [("", 1.0, val_data)]
        total = torch.zeros(len(sets), 2, device=device)
        with torch.no_grad():
            for k, (_, _, data) in enumerate(sets):
                for x, y in data.val_batches(seed, rank=rank, world=world, micro=micro, batches=t_cfg.eval_batches):
                    with autocast():
                        total[k] += torch.stack([engine(x.to(device), y.to(device), **docs(x)).float() * len(x),
                                                 torch.tensor(float(len(x)), device=device)])
        dist.all_reduce(total)
        engine.train()
        losses = (total[:, 0] / total[:, 1]).tolist()
        per_source = {f"val_loss/{name}": v for (name, _, _), v in zip(val_sets, losses)}
        v = sum(w * v for (_, w, _), v in zip(val_sets, losses)) if val_sets else losses[0]
        return {"val_loss": v, "val_ppl": math.exp(min(v, 50)), **per_source}

    def save(final: bool = False) -> str:
        watchdog.beat("save", state["step"])
        ckpt = checkpoint.save(engine, cfg, {**state, "spike": spikes.state_dict(), "world_size": world,
                                             "zero_stage": cfg.parallelism.zero_stage, "final": final},
                               data_dir / "tokenizer.json", rank=rank, report=report, uploads=uploads)
        sink.event("checkpoint", step=state["step"])
        return ckpt

    def abort(event: str, reason: str, message: str) -> None:
        profiler.close()
        sink.event(event, step=state["step"], reason=reason)
        sink.close()
        stop.close()
        eng.shutdown()
        raise UserError(message)

    start_step = state["step"]
    # Which process is which rank (for `kill`, debuggers and the fault-tolerance test).
    _rank_status(run_dir, rank, pid=os.getpid(), host=socket.gethostname(), step=start_step, world_size=world,
                 attempt=state["attempt"], node=stop.node_id)
    if rank == 0:  # a group smaller than an earlier attempt's: its extra ranks' files describe no process now
        for folder in (run_dir, run_dir / "heartbeats"):
            for stale in folder.glob("rank*.json"):
                if stale.stem[4:].isdigit() and int(stale.stem[4:]) >= world:
                    stale.unlink(missing_ok=True)
    sink.event("resume" if resume_dir else "start", step=start_step, world_size=world, attempt=state["attempt"],
               global_batch=batch.global_batch_size, grad_accum=accum, micro_batch=micro,
               tokens_per_step=batch.tokens_per_step, flops_per_token=fpt,
               precision=eng.precision_mode(t_cfg.precision), cpu_threads=torch.get_num_threads(),
               malloc_hugepages=hugepages_on(), malloc_heap_only=heap_only(),
               checkpoint=str(resume_dir) if resume_dir else None, universal=universal is not None,
               ray_checkpoint=str(ray_recorded) if ray_recorded else None,  # what Ray Train had recorded
               startup=startup.since(plan.startup["launch"], {**plan.startup, **startup.marks()})
               if plan.startup else None)
    if start_step == 0:
        sink.log({"step": 0, **evaluate()})
    engine.train()
    profiler = StepProfiler(t_cfg.profile, run_dir / "profile", rank, start=t_cfg.profile_start,
                            steps=t_cfg.profile_steps, on_written=lambda d: sink.event("profile", step=state["step"],
                                                                                    path=str(d)))
    gate = engine.update_gate
    gate.lr_scale, gate.lr_scale_until = t_cfg.rollback_lr_scale, state.get("lr_scale_until", 0)
    last: dict = {}
    stopped = False
    pending_save: str | None = None  # a save request that arrived on a step that was then undone
    skips_in_a_row = 0  # on_spike=skip: consecutive skipped steps (too many = diverged)
    debug = cfg.debug if state["attempt"] == 0 else None  # fault injection: a run's first attempt only
    values, requests = StepValues(), LaggedFlags()  # device values read only where needed (sheepop.train.host_reads)
    mark = (time.perf_counter(), state["step"])  # since the last read: its time and step (throughput)

    def line(row: StepValue) -> dict:
        """A step's metrics line from its host values."""
        return {"step": row.step, "loss": row.loss, "lr": row.lr, "grad_norm": row.grad_norm,
                "tokens": state["tokens"] - (state["step"] - row.step) * batch.tokens_per_step}

    while state["step"] < t_cfg.max_steps:
        step = state["step"]
        watchdog.beat("step", step)
        if debug and debug.hang_at_step == step + 1 and debug.hang_rank == rank:
            time.sleep(10**7)  # debug.hang_*: this rank stops here; the others wait in the next collective
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on at its end)
        loss_sum = torch.zeros((), device=device)
        window = data_step(step, state["skip_steps"])
        attended = 0.0  # data.document_mask: the step's attention span (flops_per_token), for MFU
        for m in range(accum):
            x, y = train_data.micro_batch(seed, window, rank=rank, world=world, micro=micro, accum=accum, index=m)
            doc_ids = document_ids(x, eot) if eot is not None else None  # data.document_mask
            if doc_ids is not None:
                attended += document_attended(doc_ids) / accum
            if debug and debug.spike_at_step == window + 1:  # debug.spike_at_step: this window's targets are noise
                y = torch.randint(0, args.vocab_size, y.shape, generator=torch.Generator().manual_seed(seed + m))
            with autocast():
                loss = engine(x.to(device), y.to(device), **({} if doc_ids is None else {"doc_ids": doc_ids.to(device)}))
            watchdog.beat("backward", step)  # where ranks wait for each other's gradients
            engine.backward(loss)
            loss_sum += loss.detach().float()
            if m < accum - 1:
                engine.step()  # accumulates; the last micro-batch's step applies the update, below
        # One all-reduce carries the loss and every rank's stop and save requests. It comes before the
        # step that applies the update, so that a spike can still cancel that update (on_spike=skip).
        # The requests are read on the next step (LaggedFlags), so nothing here waits for the device.
        watchdog.beat("sync", step)
        stop_why, save_why = stop.poll()
        asks = torch.tensor([float(stop_why is not None), float(save_why is not None)]).to(device, non_blocking=True)
        buf = torch.cat([(loss_sum / accum).reshape(1), asks])
        dist.all_reduce(buf)
        asked = requests.pop()  # the previous step's requests, the same on every rank
        requests.push(buf[1:], (stop_why, save_why))
        stop_now = save_now = None
        if asked is not None:
            (stop_flag, save_flag), (stop_reason, save_reason) = asked
            stop_now = (stop_reason or "another rank was asked to stop") if stop_flag > 0 else None
            save_now = (save_reason or "another rank was asked to save") if save_flag > 0 else None
        save_now = save_now or pending_save
        # on_spike=skip decides before the update, so it reads this step's loss now (a host sync every step).
        skip_why = spikes.check((buf[0] / world).item(), None) if t_cfg.on_spike == "skip" else None
        gate.skip = skip_why is not None
        engine.step()
        gate.skip = False
        if skip_why:
            pending_save = save_now  # a save asked for on a step that is undone is taken on the next one
            skips_in_a_row += 1
            sink.log({"step": step + 1, "loss": (buf[0] / world).item(), "lr": lr, "grad_norm": _grad_norm(engine),
                      "tokens": state["tokens"]})  # the step is retried on the next window: readers take its last line
            if skips_in_a_row > t_cfg.max_rollbacks:  # every step spikes: the run has diverged
                abort("diverged", skip_why, f"training diverged at step {step + 1}: {skip_why}; {skips_in_a_row} "
                                            f"steps in a row were spikes (trainer.max_rollbacks={t_cfg.max_rollbacks}); "
                                            f"lower trainer.lr={t_cfg.lr}")
            state["skip_steps"] = sorted(set(state["skip_steps"]) | {window + 1})
            sink.event("spike", step=step + 1, reason=skip_why, action="skip", skip_steps=[window + 1])
            continue
        skips_in_a_row = 0
        state["step"] = step = step + 1
        profiler.step()
        state["tokens"] += batch.tokens_per_step
        if plan.mixture:  # the windows each source gave to this step's global batch
            counts = train_data.source_counts(seed, window, batch.global_batch_size)
            for s, c in zip(plan.mixture, counts):
                state["source_tokens"][s.name] += int(c) * seq
        values.add(step, window, lr, buf[0] / world, engine.get_global_grad_norm(),
                   attended if eot is not None else None)
        evals = bool(t_cfg.eval_every and step % t_cfg.eval_every == 0 or step == t_cfg.max_steps)
        logs = step % t_cfg.log_every == 0 or evals
        saves = bool(stop_now or save_now or step == t_cfg.max_steps
                     or (t_cfg.save_every and step % t_cfg.save_every == 0) or tasks.due(step))
        if not (logs or saves):
            continue  # nothing needs a host value: the device runs on
        # Read every step since the last read (one host sync); the spike detector and the divergence
        # guard see each of them in order, so a spike between two reads is handled at the next one.
        rows = values.read()
        elapsed, steps_run = time.perf_counter() - mark[0], step - mark[1]
        spiked = None
        for row in rows:
            spike = spikes.check(row.loss, row.grad_norm) if t_cfg.on_spike != "skip" else None
            if spike and t_cfg.on_spike != "warn":
                spiked = (row, spike)
                break
            if spike:
                sink.event("spike", step=row.step, reason=spike, action="warn")
            diverged = guard.check(row.loss, row.grad_norm)
            if diverged:
                abort("diverged", diverged, f"training diverged at step {row.step}: {diverged}; no checkpoint was "
                                            f"taken since it began, so trainer.resume=auto restarts from the last "
                                            f"good one; lower trainer.lr={t_cfg.lr}")
        if spiked:
            row, spike = spiked
            sink.log(line(row))
            if t_cfg.on_spike == "stop":
                abort("spike", spike, f"loss spike at step {row.step}: {spike}; stopped (trainer.on_spike=stop); "
                                      f"trainer.resume=auto restarts from the last checkpoint, "
                                      f"trainer.skip_steps=[{row.window + 1}] skips its data")
            if state["rollbacks"] >= t_cfg.max_rollbacks or good[0] is None:  # skipping data does not help: diverged
                why = (f"after {state['rollbacks']} rollback(s) (trainer.max_rollbacks)" if good[0] is not None
                       else "with no checkpoint to roll back to")
                abort("diverged", spike, f"training diverged at step {row.step}: {spike} {why}; "
                                         f"lower trainer.lr={t_cfg.lr}")
            # trainer.skip_steps counts windows as a run without skips numbers its steps: the windows
            # the spiking step and the rollback_skip - 1 before it trained on
            skip = [data_step(i, state["skip_steps"]) + 1
                    for i in range(max(0, row.step - t_cfg.rollback_skip), row.step)]
            sink.event("spike", step=row.step, reason=spike, action="rollback", skip_steps=skip)
            back = _rollback(engine, good, rank, uploads)
            state.update(_merged(back, state), attempt=state["attempt"], rollbacks=state["rollbacks"] + 1,
                         skip_steps=sorted(set(state["skip_steps"]) | set(skip) | set(back.get("skip_steps", []))))
            if t_cfg.rollback_lr_steps:  # a gentler rate for a while after the rollback
                state["lr_scale_until"] = state["step"] + t_cfg.rollback_lr_steps
            gate.lr_scale_until = state.get("lr_scale_until", 0)
            engine.lr_scheduler.refresh()  # the checkpoint brought back the rate it saved
            guard = DivergenceGuard(args.vocab_size)
            sink.event("rollback", step=state["step"], from_step=row.step, checkpoint=str(good[0]),
                       skip_steps=state["skip_steps"], rollbacks=state["rollbacks"],
                       lr_scale=t_cfg.rollback_lr_scale if t_cfg.rollback_lr_steps else 1.0,
                       lr_scale_until=state.get("lr_scale_until", 0))
            pending_save = save_now  # taken after the rollback (a stop is sticky: the next step reads it again)
            mark = (time.perf_counter(), state["step"])
            continue
        pending_save = None
        # Throughput over the steps since the last read: on a GPU a single step's time is only what
        # the host took to queue it.
        tokens_per_sec = steps_run * batch.tokens_per_step / elapsed
        spans = [r.attended for r in rows if r.attended is not None]
        last = {**line(rows[-1]), "tokens_per_sec": tokens_per_sec, "step_time": elapsed / steps_run}
        last.update({f"tokens/{n}": v for n, v in state.get("source_tokens", {}).items()} if plan.mixture else {})
        last.update(step_extras(flops_per_token=fpt if not spans else flops_per_token(args, seq, sum(spans) / len(spans)),
                                tokens_per_sec=tokens_per_sec, world_size=world, device=device, precision=compute))
        if evals:
            watchdog.beat("eval", step)
            last.update(evaluate())
            eval_extras(engine=engine, cfg=cfg, step=step, rank=rank, sink=sink, tokenizer=data_dir / "tokenizer.json")
        if logs:
            sink.log(last)
            for result in tasks.poll():
                sink.task_scores(result)
        stopped = stop_now is not None
        if save_now:
            sink.event("save_requested", step=step, reason=save_now)
        if saves:
            if guard.suspect:  # never let a diverging model displace a good checkpoint
                sink.event("checkpoint_skipped", step=step, reason="the loss looks like divergence")
            else:
                good = (save(final=step == t_cfg.max_steps), None)
                if tasks.due(step):
                    tasks.submit(step, good[0])
        if stopped:
            sink.event("stop", step=step, reason=stop_now)
            break
        mark = (time.perf_counter(), step)  # evaluation and saving are not training time

    profiler.close()
    watchdog.close()  # what follows waits on uploads, which have no step-sized timeout
    probe = _probe_loss(engine, val_data, seed, micro, autocast, device, docs)
    _rank_status(run_dir, rank, pid=os.getpid(), host=socket.gethostname(), step=state["step"], world_size=world,
                 attempt=state["attempt"], probe_loss=probe)
    if uploads is not None:
        uploads.wait()  # the last checkpoint is in storage before the run says it ended
    for result in tasks.close():  # the scores of the last evaluated checkpoint belong to the run
        sink.task_scores(result)
    sink.event("end", step=state["step"], stopped=stopped)
    sink.close()
    stop.close()
    eng.shutdown()
    return {**last, "stopped": stopped, "probe_loss": probe}


def _merged(meta: dict, state: dict) -> dict:
    """A checkpoint's meta.json as loop state: the skipped steps of both (a run resumed with more
    trainer.skip_steps keeps the checkpoint's too)."""
    return {**meta, "skip_steps": sorted(set(meta.get("skip_steps", [])) | set(state["skip_steps"]))}


def _rollback(engine, good: tuple, rank: int, uploads) -> dict:
    """Every rank loads the last good checkpoint (saved by this group, or the one it started
    from) into the running engine; returns its meta.json. A checkpoint still uploading is waited for."""
    ckpt, universal = good
    if uploads is not None:
        uploads.wait()
    deadline = time.monotonic() + 600
    while checkpoint_files.problem(ckpt) is not None:  # Ray Train's async upload of it is still going
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollback: checkpoint {ckpt} did not complete: {checkpoint_files.problem(ckpt)}")
        time.sleep(0.5)
    dist.barrier()
    return checkpoint.load(engine, ckpt, rank, universal)


def _restored_universal(ckpt: str, rank: int, world: int, cfg) -> str | None:
    """A checkpoint Ray Train hands a restarted group was saved by the group before the failure:
    the same world and stage, unless the group came back smaller. Then rank 0 converts it (the
    driver never saw this checkpoint) and everyone waits."""
    if not checkpoint.needs_universal(ckpt, world, cfg.parallelism.zero_stage):
        return None
    run = checkpoint.run_storage(cfg)
    if rank == 0:
        checkpoint.to_universal(ckpt, run)
    dist.barrier()
    return checkpoint.universal_location(ckpt, run)


def _rank_status(run_dir: Path, rank: int, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(fields))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _probe_loss(engine, val_data: TokenWindows, seed: int, micro: int, autocast, device, docs) -> float:
    """Loss of the final weights on one fixed batch, identical on every rank: ranks (and ZeRO
    stages) that hold the same model report the same number."""
    x, y = next(val_data.val_batches(seed, rank=0, world=1, micro=micro, batches=1))
    engine.eval()
    with torch.no_grad(), autocast():
        return engine(x.to(device), y.to(device), **docs(x)).float().item()
