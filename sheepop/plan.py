"""What a run costs before it starts (nothing is allocated): the logic of `sheepop plan`
(sheepop.cli.plan) and of the fit check `sheepop submit` runs.

Parameters and FLOPs come from the model's shape; memory per GPU from a model of what
sheepop's training actually holds on each rank:

  The default precision (bf16) is DeepSpeed's bf16 mode with torch AdamW as the client
  optimizer; bf16-autocast and fp32 keep fp32 weights. Measured from DeepSpeed 0.19 engines
  (tests/unit/test_plan.py), per parameter:
                  bf16                        bf16-autocast / fp32
    weights       2 B                         4 B                       ÷N at ZeRO-3
    gradients     2 B                         4 B                       ÷N at ZeRO ≥ 1 (reduced
                                              straight into the rank's partition, even at stage 1)
    optimizer     fp32 master + Adam m, v:    Adam m, v: 8 B at stage 0; at stages 1-3 DeepSpeed
                  12 B, ÷N at ZeRO ≥ 1        adds an fp32 copy of the partition: 12 B ÷N
    buffers       gradient-reduce buckets (reduce_bucket_size elements of the gradient dtype, two
                  with overlap_comm at stages 1-2); at ZeRO-3 the gathered weights of ~2 blocks
    activations   tensors saved for backward (flash attention, so nothing grows with seq², except with
                  data.document_mask: SDPA saves an additive seq × seq mask per layer), under
                  bf16-autocast also the bf16 weight copies it saves (2 B/param, not sharded even
                  at ZeRO-3), and the logits' forward/backward transient. A checkpointed block
                  (model.activation_checkpointing) keeps only its input, its weight copies are not
                  kept, and one block at a time recomputes its full activations during backward
  Offload moves the optimizer state and fp32 gradient partition (offload_optimizer) and the
  weights (offload_params, ZeRO-3) to CPU memory.

Time: FLOPs per token (PaLM-style: 6 × matmul params + attention) × tokens ÷ (GPUs × peak
bf16 dense FLOP/s × cluster.mfu). GPU memory and peaks come from sheepop.perf.GPUS.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from sheepop.errors import UserError
from sheepop.perf import GPU, GPUS
from sheepop.units import duration, human

if TYPE_CHECKING:
    from sheepop.config import Config
    from sheepop.model.config import ModelConfig

GIB = 1024**3
RESERVED_GIB = 1.5  # CUDA context, allocator and NCCL workspaces
USABLE_FRACTION = 0.92  # the caching allocator's fragmentation


def plannable() -> list[str]:
    """The cluster.gpu names `sheepop plan` knows the memory of."""
    return [name for name, gpu in GPUS.items() if gpu.memory_gib is not None]


def gpu_spec(name: str) -> GPU:
    if name not in plannable():
        what = "its memory size is not in sheepop.perf.GPUS" if name in GPUS else "unknown GPU type"
        raise UserError(f"cluster.gpu={name}: {what}; valid: {', '.join(plannable())}")
    return GPUS[name]


def usable_bytes(gpu: GPU) -> float:
    return (gpu.memory_gib * USABLE_FRACTION - RESERVED_GIB) * GIB


# ---------------------------------------------------------------------------------------------
# Memory model


MODES = ("bf16", "bf16-autocast", "fp32")  # trainer.precision once `auto` is resolved (engine.precision_mode)


def activation_bytes(model: ModelConfig, micro: int, seq: int, precision: str,
                     document_mask: bool = False) -> dict[str, float]:
    """Bytes of one micro-batch's activations: `saved` (kept for backward, counted from what
    autograd saves in sheepop's Transformer: see tests/unit/test_plan.py; with activation
    checkpointing also the block being recomputed) and `transient` (the logits' output and fp32
    gradient at the peak of backward)."""
    from sheepop.model.config import checkpointed_layers

    d, f, V, L = model.d_model, model.d_ff, model.vocab_size, model.n_layers
    kv = model.n_kv_heads * model.head_dim
    b = 4 if precision == "fp32" else 2  # bytes of a matmul output
    if precision == "bf16":
        # Each RMSNorm saves its fp32 upcast (4d), the bf16 normalised value (2d) and the
        # bf16 output that the next linears share (2d).
        norms = 2 * (4 + 2 + 2) * d
        head_norm = 8 * d
    else:
        # fp32 weights: each RMSNorm saves its fp32 input and normalised output (8d); its output
        # feeds the linears, which under autocast each cast it to bf16 apart (q/k/v: 3, w1/w3: 2).
        norms = 16 * d + (10 * d if precision == "bf16-autocast" else 8 * d)
        head_norm = 8 * d + b * d
    attn = b * d + b * kv + b * kv + b * d + b * d + 4 * model.n_heads  # rope'd q, k; v; SDPA out + lse; wo input
    mlp = 4 * b * f  # w1 out, w3 out, silu out, their product
    per_token_layer = norms + attn + mlp
    head = head_norm + 4 * V + 8  # final norm (+ head input), fp32 log-softmax, token ids
    # Checkpointed blocks keep their input (the residual stream: bf16 in bf16 mode, else fp32);
    # during backward one of them at a time holds its full activations again.
    ckpt = len(checkpointed_layers(L, model.activation_checkpointing, model.activation_checkpointing_every))
    residual = (2 if precision == "bf16" else 4) * d
    blocks = (L - ckpt) * per_token_layer + ckpt * residual + (per_token_layer if ckpt else 0)
    tokens = micro * seq
    saved = tokens * (blocks + head)
    if document_mask:  # data.document_mask, as measured with torch 2.13's SDPA (tests/unit/test_plan.py)
        # SDPA turns the (micro, 1, seq, seq) boolean mask into an additive one in the query's dtype
        # and saves it, in each layer that keeps its activations (and the block being recomputed);
        # checkpointed blocks keep the boolean mask as their input (one copy, shared). RoPE's cos/sin
        # become per window (micro, seq, head_dim/2, fp32 each) instead of shared by the batch.
        pairs = micro * seq * seq
        rope = 2 * (micro - 1) * seq * (model.head_dim // 2) * 4
        saved += ((L - ckpt + (1 if ckpt else 0)) * (4 if precision == "fp32" else 2) * pairs
                  + (pairs if ckpt else 0) + rope * (2 if ckpt else 1))
    return {"saved": saved, "transient": tokens * V * (b + 4)}


def memory(model: ModelConfig, *, stage: int, world: int, micro: int, seq: int, precision: str = "bf16",
           offload_optimizer: bool = False, offload_params: bool = False, reduce_bucket_size: int = 50_000_000,
           overlap_comm: bool = True, grad_accum: str = "auto", document_mask: bool = False) -> dict:
    """Bytes per rank on the GPU (params, grads, optimizer, buffers, activations, total) and
    in CPU memory (cpu) for one ZeRO configuration. precision: one of MODES."""
    from sheepop.config import grad_accum_dtype
    from sheepop.model.config import checkpointed_layers
    from sheepop.model.transformer import num_params

    if precision not in MODES:
        raise ValueError(f"precision={precision}; valid: {', '.join(MODES)}")
    n = num_params(model)
    shard = world if world > 1 else 1
    w = 2 if precision == "bf16" else 4  # bytes per weight and per gradient element
    params = w * n / (shard if stage == 3 else 1)
    if precision == "bf16" and grad_accum_dtype(precision, grad_accum if stage >= 2 else "bf16", stage) == "fp32":
        grads = 4 * n / shard  # fp32 accumulators beside bf16 weights: this rank's shard (ZeRO 2-3)
    else:
        grads = w * n / (shard if stage >= 1 else 1)
    if precision == "bf16":
        optim = 12 * n / (shard if stage >= 1 else 1)  # fp32 master + Adam m, v
    else:
        optim = 8 * n if stage == 0 else 12 * n / shard
    d, hd = model.d_model, model.head_dim
    block = 2 * d * hd * (model.n_heads + model.n_kv_heads) + 3 * d * model.d_ff + 2 * d  # one layer's params
    buffers = 0.0
    if stage in (1, 2):
        buffers = reduce_bucket_size * w * (2 if overlap_comm else 1)
    elif stage == 3:
        buffers = reduce_bucket_size * w + 2 * w * max(block, model.vocab_size * model.d_model)
    buffers = min(buffers, w * n * 2)  # buckets never exceed what they carry
    act = activation_bytes(model, micro, seq, precision, document_mask)
    # autocast's bf16 casts, saved for backward; checkpointed blocks' only while one is recomputed.
    ckpt = len(checkpointed_layers(model.n_layers, model.activation_checkpointing, model.activation_checkpointing_every))
    weight_copies = 2 * (n - max(ckpt - 1, 0) * block) if precision == "bf16-autocast" else 0
    cpu = 0.0
    if offload_optimizer:
        cpu += optim + 4 * n / shard  # + the fp32 gradient partition the CPU optimizer steps with
        if precision != "bf16":
            cpu += 4 * n / shard  # + DeepSpeed's staging copy of the fp32 partition
        optim, grads = 0.0, 0.0
    if offload_params:
        cpu += params
        params = 0.0
    activations = act["saved"] + act["transient"] + weight_copies
    total = params + grads + optim + buffers + activations
    return {"params": params, "grads": grads, "optimizer": optim, "buffers": buffers, "activations": activations,
            "total": total, "cpu": cpu}


# ---------------------------------------------------------------------------------------------
# The plan of one config


def _precision(cfg: Config) -> str:
    p = cfg.trainer.precision
    return "bf16" if p == "auto" else p  # every GPU `sheepop plan` knows has bf16


def _mem_for(cfg: Config, *, stage: int | None = None, world: int | None = None, micro: int | None = None,
             offload_optimizer: bool | None = None, offload_params: bool | None = None) -> dict:
    p, t = cfg.parallelism, cfg.trainer
    return memory(cfg.model, stage=p.zero_stage if stage is None else stage, world=world or cfg.cluster.num_workers,
                  micro=micro or t.micro_batch_size, seq=t.seq_len or cfg.model.max_seq_len, precision=_precision(cfg),
                  offload_optimizer=p.offload_optimizer if offload_optimizer is None else offload_optimizer,
                  offload_params=p.offload_params if offload_params is None else offload_params,
                  reduce_bucket_size=p.reduce_bucket_size, overlap_comm=p.overlap_comm, grad_accum=t.grad_accum_dtype,
                  document_mask=cfg.data.document_mask)


def _checkpointing(cfg: Config) -> str:
    m = cfg.model
    if m.activation_checkpointing == "none":
        return ""
    every = f" every {m.activation_checkpointing_every}" if m.activation_checkpointing == "selective" else ""
    return f", activation checkpointing {m.activation_checkpointing}{every}"


def _settings(cfg: Config) -> str:
    p = cfg.parallelism
    s = f"ZeRO-{p.zero_stage}"
    s += " + optimizer offload" if p.offload_optimizer else ""
    s += " + param offload" if p.offload_params else ""
    return f"{s}, micro batch {cfg.trainer.micro_batch_size}, {cfg.cluster.num_workers} × {cfg.cluster.gpu}"


def alternatives(cfg: Config) -> list[str]:
    """Overrides that would make the run fit, cheapest first (each one a complete suggestion)."""
    limit = usable_bytes(gpu_spec(cfg.cluster.gpu))
    p, t = cfg.parallelism, cfg.trainer
    world, micro = cfg.cluster.num_workers, t.micro_batch_size
    out: list[str] = []

    def fits(**kw) -> bool:
        return _mem_for(cfg, **kw)["total"] <= limit

    def valid(w: int, m: int) -> bool:  # a pinned global batch must split into micro batches on w GPUs
        return not t.global_batch_size or t.global_batch_size % (m * w) == 0

    # Same GPUs and batch, more sharding / offload.
    ladder = [(s, False, False) for s in (1, 2, 3)] + [(2, True, False), (3, True, False), (3, True, True)]
    for stage, off_o, off_p in ladder:
        if (stage, off_o, off_p) <= (p.zero_stage, p.offload_optimizer, p.offload_params):
            continue
        if fits(stage=stage, offload_optimizer=off_o, offload_params=off_p):
            out.append(f"parallelism.zero_stage={stage}" + (" parallelism.offload_optimizer=true" if off_o else "")
                       + (" parallelism.offload_params=true" if off_p else ""))
            break
    # Smaller micro batch at the chosen and at the strongest in-GPU stage (accumulation keeps the batch).
    for stage in sorted({p.zero_stage, 3}):
        m = micro - 1
        while m >= 1 and not (valid(world, m) and fits(stage=stage, micro=m)):
            m -= 1
        if m >= 1:
            # A pinned global batch keeps itself (accumulation adapts); otherwise keep tokens per step.
            accum = t.grad_accum_steps or 1
            keep = (f" trainer.grad_accum_steps={accum * micro // m}"
                    if not t.global_batch_size and (accum * micro) % m == 0 else "")
            out.append((f"parallelism.zero_stage={stage} " if stage != p.zero_stage else "")
                       + f"trainer.micro_batch_size={m}{keep}")
            break
    # More GPUs (ZeRO-3 shards everything but activations).
    for stage in sorted({max(p.zero_stage, 1), 3}):
        w = world * 2
        while w <= 4096 and not (valid(w, micro) and fits(stage=stage, world=w)):
            w *= 2
        if w <= 4096:
            out.append(f"cluster.num_workers={w}" + (f" parallelism.zero_stage={stage}" if stage != p.zero_stage else ""))
            break
    return out


def check_fits(cfg: Config) -> tuple[bool, str]:
    """(ok, one-paragraph message): does the run fit in cluster.gpu's memory per rank?

    `cfg` is the composed Config. Raises UserError for an unknown cluster.gpu. Used by
    `sheepop plan` and `sheepop submit` (which refuses unless forced).
    """
    gpu = gpu_spec(cfg.cluster.gpu)
    total = _mem_for(cfg)["total"]
    limit = usable_bytes(gpu)
    need = f"{total / GIB:.1f} GiB per GPU"
    have = f"{limit / GIB:.1f} GiB usable on one {cfg.cluster.gpu} ({gpu.memory_gib:g} GiB)"
    if total <= limit:
        return True, f"fits: {need} of {have} ({_settings(cfg)})"
    alts = alternatives(cfg)
    msg = f"does not fit: {need} > {have} ({_settings(cfg)})"
    msg += "; would fit: " + " | ".join(alts) if alts else "; nothing tried fits (a smaller model or shorter sequences)"
    return False, msg


def summary(cfg: Config) -> dict:
    """Everything `sheepop plan` prints, as numbers (batch: the BatchPlan; time at cluster.mfu)."""
    from sheepop.config import batch_plan
    from sheepop.model.transformer import flops_per_token, num_params

    gpu = gpu_spec(cfg.cluster.gpu)
    model, world, steps, mfu = cfg.model, cfg.cluster.num_workers, cfg.trainer.max_steps, cfg.cluster.mfu
    bp = batch_plan(cfg, world)
    total = num_params(model)
    embedding = model.vocab_size * model.d_model
    fpt = flops_per_token(model, bp.seq_len)
    tokens = bp.tokens_per_step * steps
    seconds = fpt * tokens / (world * gpu.bf16 * mfu)
    stages = {}
    for stage in (0, 1, 2, 3):
        stages[f"zero{stage}"] = _mem_for(cfg, stage=stage, offload_optimizer=False, offload_params=False)
        if stage >= 1:
            stages[f"zero{stage}+offload"] = _mem_for(cfg, stage=stage, offload_optimizer=True,
                                                      offload_params=stage == 3)
    ok, message = check_fits(cfg)
    return {"params": total, "embedding_params": embedding, "non_embedding_params": total - embedding,
            "flops_per_token": fpt, "batch": bp, "steps": steps, "tokens": tokens,
            "gpu": cfg.cluster.gpu, "world": world, "usable_gib": usable_bytes(gpu) / GIB,
            "mfu": mfu, "seconds": seconds, "gpu_hours": seconds * world / 3600, "memory": stages,
            "chosen": _mem_for(cfg), "fits": ok, "message": message}


def render(s: dict, cfg: Config) -> str:
    bp, p = s["batch"], cfg.parallelism
    chosen = f"zero{p.zero_stage}" + ("+offload" if p.offload_optimizer or p.offload_params else "")
    big = max(m["total"] for m in s["memory"].values()) >= GIB
    unit, unit_name = (GIB, "GiB") if big else (1024**2, "MiB")
    lines = [
        f"model {cfg.model.name}: {s['params']:,} parameters ({human(s['params'])}): "
        f"embedding {s['embedding_params']:,} (token table), non-embedding {s['non_embedding_params']:,}",
        f"FLOPs per token (train, fwd+bwd): {human(s['flops_per_token'], 'FLOP')}"
        + (" (whole windows: with data.document_mask attention does less, which training's MFU counts per step)"
           if cfg.data.document_mask else ""),
        f"batch: {bp.global_batch_size} sequences × {bp.seq_len} tokens = {bp.tokens_per_step:,} tokens per "
        f"optimizer step (micro {bp.micro_batch_size} × accum {bp.grad_accum_steps} × {s['world']} GPUs)",
        f"run: {s['steps']:,} steps = {s['tokens']:,} tokens ({human(s['tokens'])})",
        "",
        f"memory per GPU, {unit_name} ({s['world']} × {s['gpu']}, {s['usable_gib']:.1f} GiB usable; "
        f"{_precision(cfg)}, AdamW{_checkpointing(cfg)}{', document mask' if cfg.data.document_mask else ''}):",
        f"  {'ZeRO':<16}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>9}{'activ.':>8}{'total':>8}"
        f"{'CPU/rank':>10}  fits",
    ]
    for name, m in s["memory"].items():
        mark = " <- chosen" if name == chosen else ""
        fit = "yes" if m["total"] <= s["usable_gib"] * GIB else "NO"
        lines.append(f"  {name:<16}" + "".join(f"{m[k] / unit:>{w}.1f}" for k, w in (
            ("params", 8), ("grads", 8), ("optimizer", 8), ("buffers", 9), ("activations", 8), ("total", 8),
            ("cpu", 10))) + f"  {fit}{mark}")
    lines += [
        "  (offload rows: ZeRO-1/2 offload the optimizer; ZeRO-3 offloads optimizer and parameters)",
        "",
        f"time at {s['mfu']:.0%} MFU (cluster.mfu; {human(GPUS[s['gpu']].bf16, 'FLOP/s')} bf16 peak per GPU): "
        f"{duration(s['seconds'])} wall, {s['gpu_hours']:,.1f} GPU-hours",
        "",
        s["message"],
    ]
    return "\n".join(lines)
