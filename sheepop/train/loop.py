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

from sheepop.data.loader import TokenWindows
from sheepop.data.shards import verify_prepared
from sheepop.errors import UserError
from sheepop.model.transformer import Transformer, flops_per_token
from sheepop.train import checkpoint, engine as eng
from sheepop.train.guard import DivergenceGuard
from sheepop.train.metrics import MetricsSink, eval_extras, step_extras
from sheepop.train.run_plan import RunPlan
from sheepop.train.stop import StopRequest

def train(plan: RunPlan, report=None, restored: str | None = None) -> dict:
    """Train to trainer.max_steps (or a stop request); returns the last metrics of this rank.

    report(dir, name): Ray Train's checkpoint hand-off (None without Ray).
    restored: the checkpoint Ray Train hands a restarted worker group; it replaces plan.resume.
    """
    rank, world = eng.init_distributed()
    plan.verify_world(world)
    cfg, batch = plan.cfg, plan.batch
    t_cfg = cfg.trainer
    run_dir = Path(cfg.run.dir)
    seed = cfg.run.seed
    # The prepared data on this node (a verified local copy when data.out_dir is in storage).
    data_dir = verify_prepared(cfg.data.out_dir, plan.manifest, where=socket.gethostname())
    manifest = plan.manifest
    micro, accum, seq = batch.micro_batch_size, batch.grad_accum_steps, batch.seq_len
    amp = eng.autocast_dtype(t_cfg.precision)  # bf16-autocast only; DeepSpeed's bf16 mode casts the module itself
    compute = eng.compute_dtype(t_cfg.precision)  # what matmuls run in: picks the peak for MFU
    device = eng.device()

    torch.manual_seed(seed)  # same init on every rank
    args = cfg.model
    model = Transformer(args)
    resume_dir = restored or plan.resume
    universal = plan.universal if restored is None else _restored_universal(restored, rank, world, cfg)
    engine = eng.build(model, cfg, batch, load_universal=universal is not None)
    state = {"step": 0, "tokens": 0, "wandb_id": None, "attempt": 0}
    if resume_dir is not None:
        state.update(checkpoint.load(engine, resume_dir, rank, universal))
        state["attempt"] = state.get("attempt", 0) + 1
    uploads = checkpoint.Uploads() if report is None else None  # Ray Train uploads when it is there

    train_data = TokenWindows(data_dir, manifest, "train", seq)
    val_data = TokenWindows(data_dir, manifest, "val", seq)
    sink = MetricsSink(cfg, rank, state.get("wandb_id"), attempt=state["attempt"])
    state["wandb_id"] = sink.wandb_id
    stop = StopRequest(run_dir, plan.stop_channel, rank)
    fpt = flops_per_token(args, seq)
    guard = DivergenceGuard(args.vocab_size)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    def evaluate() -> float:
        engine.eval()
        total = torch.zeros(2, device=device)
        with torch.no_grad():
            for x, y in val_data.val_batches(seed, rank=rank, world=world, micro=micro,
                                             batches=t_cfg.eval_batches):
                with autocast():
                    total += torch.stack([engine(x.to(device), y.to(device)).float() * len(x),
                                          torch.tensor(float(len(x)), device=device)])
        dist.all_reduce(total)
        engine.train()
        return (total[0] / total[1]).item()

    def save(final: bool = False) -> None:
        checkpoint.save(engine, cfg, {**state, "world_size": world, "zero_stage": cfg.parallelism.zero_stage,
                                      "final": final},
                        data_dir / "tokenizer.json", rank=rank, report=report, uploads=uploads)
        sink.event("checkpoint", step=state["step"])

    start_step = state["step"]
    # Which process is which rank (for `kill`, debuggers and the fault-tolerance test).
    _rank_status(run_dir, rank, pid=os.getpid(), host=socket.gethostname(), step=start_step, world_size=world,
                 attempt=state["attempt"])
    sink.event("resume" if resume_dir else "start", step=start_step, world_size=world, attempt=state["attempt"],
               global_batch=batch.global_batch_size, grad_accum=accum, micro_batch=micro,
               tokens_per_step=batch.tokens_per_step, flops_per_token=fpt,
               precision=eng.precision_mode(t_cfg.precision),
               checkpoint=str(resume_dir) if resume_dir else None, universal=universal is not None)
    if start_step == 0:
        sink.log({"step": 0, "val_loss": (v := evaluate()), "val_ppl": math.exp(min(v, 50))})
    engine.train()
    last: dict = {}
    stopped = False
    while state["step"] < t_cfg.max_steps:
        step = state["step"]
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on at its end)
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            x, y = train_data.micro_batch(seed, step, rank=rank, world=world, micro=micro, accum=accum, index=m)
            with autocast():
                loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        # One all-reduce carries the loss and every rank's stop and save requests.
        stop_why, save_why = stop.poll()
        buf = torch.stack([loss_sum / accum, torch.tensor(float(stop_why is not None), device=device),
                           torch.tensor(float(save_why is not None), device=device)])
        dist.all_reduce(buf)
        state["step"] = step = step + 1
        state["tokens"] += batch.tokens_per_step
        dt = time.perf_counter() - t0
        last = {"step": step, "loss": (buf[0] / world).item(), "lr": lr,
                "grad_norm": _grad_norm(engine), "tokens": state["tokens"],
                "tokens_per_sec": batch.tokens_per_step / dt, "step_time": dt}
        last.update(step_extras(flops_per_token=fpt, tokens_per_sec=last["tokens_per_sec"], world_size=world,
                                device=device, precision=compute))
        diverged = guard.check(last["loss"], last["grad_norm"])
        if diverged:
            sink.event("diverged", step=step, reason=diverged)
            sink.close()
            stop.close()
            eng.shutdown()
            raise UserError(f"training diverged at step {step}: {diverged}; no checkpoint was taken since it "
                            f"began, so trainer.resume=auto restarts from the last good one; lower trainer.lr={t_cfg.lr}")
        if t_cfg.eval_every and step % t_cfg.eval_every == 0 or step == t_cfg.max_steps:
            last["val_loss"] = evaluate()
            last["val_ppl"] = math.exp(min(last["val_loss"], 50))
            eval_extras(engine=engine, cfg=cfg, step=step, rank=rank, sink=sink, tokenizer=data_dir / "tokenizer.json")
        if step % t_cfg.log_every == 0 or "val_loss" in last or step == t_cfg.max_steps:
            sink.log(last)
        stopped, save_now = buf[1].item() > 0, buf[2].item() > 0
        if save_now:
            sink.event("save_requested", step=step, reason=save_why or "another rank was asked to save")
        if stopped or save_now or step == t_cfg.max_steps or (t_cfg.save_every and step % t_cfg.save_every == 0):
            if guard.suspect:  # never let a diverging model displace a good checkpoint
                sink.event("checkpoint_skipped", step=step, reason="the loss looks like divergence")
            else:
                save(final=step == t_cfg.max_steps)
        if stopped:
            sink.event("stop", step=step, reason=stop_why or "another rank was asked to stop")
            break

    probe = _probe_loss(engine, val_data, seed, micro, autocast, device)
    _rank_status(run_dir, rank, pid=os.getpid(), host=socket.gethostname(), step=state["step"], world_size=world,
                 attempt=state["attempt"], probe_loss=probe)
    if uploads is not None:
        uploads.wait()  # the last checkpoint is in storage before the run says it ended
    sink.event("end", step=state["step"], stopped=stopped)
    sink.close()
    stop.close()
    eng.shutdown()
    return {**last, "stopped": stopped, "probe_loss": probe}


def _restored_universal(ckpt: str, rank: int, world: int, cfg) -> str | None:
    """A checkpoint Ray Train hands a restarted group was saved by the group before the failure:
    the same world and stage, unless the group came back smaller. Then rank 0 converts it (the
    driver never saw this checkpoint) and everyone waits."""
    if not checkpoint.needs_universal(ckpt, world, cfg.parallelism.zero_stage):
        return None
    if rank == 0:
        checkpoint.to_universal(ckpt)
    dist.barrier()
    return checkpoint.universal_location(ckpt)


def _rank_status(run_dir: Path, rank: int, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(fields))


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _probe_loss(engine, val_data: TokenWindows, seed: int, micro: int, autocast, device) -> float:
    """Loss of the final weights on one fixed batch, identical on every rank: ranks (and ZeRO
    stages) that hold the same model report the same number."""
    x, y = next(val_data.val_batches(seed, rank=0, world=1, micro=micro, batches=1))
    engine.eval()
    with torch.no_grad(), autocast():
        return engine(x.to(device), y.to(device)).float().item()
