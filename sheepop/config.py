"""Typed configuration: one dataclass per Hydra group, registered in the ConfigStore.

Every YAML file under conf/<group>/ is validated against its group's dataclass (the files
name `<group>_schema` in their defaults list), so a misspelt key or a wrong type fails at
compose time. `compose()` turns Hydra's multi-line errors into one `UserError` line, and
`validate()` checks what types alone cannot (ranges, combinations) before anything starts.
Workers never see Hydra: they get the plain dict from `to_dict()`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sheepop.errors import UserError

GROUPS = ("model", "data", "tokenizer", "trainer", "parallelism", "cluster", "logger")


@dataclass
class RunConfig:
    name: str = "sheepop"  # run name: W&B run name, Ray Train run name
    dir: str = "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}"  # everything the run writes goes here
    seed: int = 1337  # model init, data windows and sampling all derive from it


@dataclass
class ModelConfig:
    name: str = MISSING  # preset name, e.g. tiny, small, gpt2-124m, llama-7b
    vocab_size: int = 1024  # embedding rows; the tokenizer is trained to this size
    d_model: int = 96  # residual stream width
    n_layers: int = 3  # transformer blocks
    n_heads: int = 4  # query heads; head_dim = d_model / n_heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); = n_heads is plain MHA
    d_ff: int = 256  # SwiGLU hidden width
    max_seq_len: int = 128  # context length: RoPE table size and training window
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share token embedding and output head weights
    init_std: float = 0.02  # normal init std; residual projections are scaled by 1/sqrt(2L)


@dataclass
class DataConfig:
    name: str = MISSING  # preset name; also names the prepared-data folder
    source: str = "stdlib"  # stdlib | files | jsonl
    paths: list[str] = field(default_factory=list)  # files, dirs or globs (source=files|jsonl)
    extensions: list[str] = field(
        default_factory=lambda: [".py", ".md", ".txt", ".rst"]
    )  # which files a directory contributes
    text_field: str = "text"  # JSONL key that holds the document text
    max_bytes: int = 0  # stop reading after this many bytes of text (0 = everything)
    val_fraction: float = 0.02  # share of documents held out for validation (by document)
    shard_tokens: int = 16_777_216  # tokens per shard file
    out_dir: str = "outputs/data/${data.name}-v${tokenizer.vocab_size}"  # shards + manifest.json; reused when inputs match
    num_workers: int = 1  # tokenization processes in `prepare`


@dataclass
class TokenizerConfig:
    name: str = MISSING
    path: str = ""  # an existing tokenizer.json to use instead of training one
    vocab_size: int = "${model.vocab_size}"  # type: ignore[assignment]  # follows the model
    train_bytes: int = 8_000_000  # train the BPE on (at most) this many bytes of the corpus
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>", "<|pad|>"])


@dataclass
class TrainerConfig:
    name: str = MISSING
    max_steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # sequences per rank per forward pass
    global_batch_size: int = 0  # sequences per optimizer step; 0 = micro × accum × workers
    grad_accum_steps: int = 1  # used when global_batch_size = 0
    seq_len: int = 0  # window length; 0 = model.max_seq_len
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 20  # linear warmup from 0
    weight_decay: float = 0.1  # applied to matrices only, not norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast where the hardware has it)
    eval_every: int = 50  # steps between validation passes (0 = only at the end)
    eval_batches: int = 8  # micro-batches per validation pass
    save_every: int = 100  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    log_every: int = 1  # steps between metrics lines
    resume: str = "auto"  # auto (latest in run.dir) | never | path to a checkpoint
    sample_prompt: str = "def "  # prompt of the sample printed at the end
    sample_tokens: int = 80  # tokens generated for that sample
    progress: bool = True  # rich progress bar on rank 0


@dataclass
class ParallelismConfig:
    name: str = MISSING
    zero_stage: int = 0  # 0 = DDP-style data parallel, 1 = optimizer, 2 = +grads, 3 = +params
    offload_optimizer: bool = False  # optimizer state in CPU memory (stages 1-3)
    offload_params: bool = False  # parameters in CPU memory (stage 3)
    overlap_comm: bool = True  # overlap gradient reduction with backward
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000  # elements per gradient-reduce bucket
    allgather_bucket_size: int = 50_000_000  # elements per all-gather bucket (stages 1-2)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last


@dataclass
class ClusterConfig:
    name: str = MISSING
    kind: str = "local"  # process (no Ray, 1 rank) | local (start Ray here) | ray (connect)
    address: str = ""  # Ray address for kind=ray; empty = $RAY_ADDRESS
    num_workers: int = 1  # training processes (ranks)
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1
    storage_path: str = ""  # where Ray Train keeps checkpoints; empty = <run.dir>/ray
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    num_cpus: int = 0  # kind=local: CPUs Ray may use (0 = all)
    gpu: str = "h100-80gb"  # GPU type, for `sheepop plan`


@dataclass
class LoggerConfig:
    name: str = MISSING
    kind: str = "none"  # none | wandb
    mode: str = "auto"  # auto (online when a key is configured) | online | offline | disabled
    project: str = "sheepop"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    trainer: TrainerConfig = MISSING
    parallelism: ParallelismConfig = MISSING
    cluster: ClusterConfig = MISSING
    logger: LoggerConfig = MISSING


def register() -> None:
    cs = ConfigStore.instance()
    # The primary config's defaults list starts with config_schema: every group node is then
    # typed by its field's dataclass, which validates whichever conf/<group>/*.yaml fills it.
    cs.store(name="config_schema", node=Config)


register()


def conf_dir() -> Path:
    """The conf/ folder: $SHEEPOP_CONF_DIR, ./conf, or the one beside the package."""
    env = os.environ.get("SHEEPOP_CONF_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "conf", Path(__file__).resolve().parent.parent / "conf"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c.resolve()
    raise UserError(f"no conf/config.yaml found (looked in {', '.join(map(str, candidates))})")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.endswith("_schema"))


def compose(overrides: list[str]) -> DictConfig:
    """Hydra compose + validation; every failure becomes one UserError line."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides))
            # Resolve now, inside Hydra's context: ${now:...} and friends need it.
            OmegaConf.resolve(cfg)
    except UserError:
        raise
    except Exception as e:  # Hydra/OmegaConf raise many types; all mean "bad override"
        raise UserError(_explain(e, overrides)) from None
    validate(cfg)
    return cfg


def _explain(e: Exception, overrides: list[str]) -> str:
    """Turn a Hydra/OmegaConf exception into one line naming the key and valid choices."""
    msg = str(e).strip()
    cause = str(e.__cause__ or "").strip()
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, name = m.groups()
        return f"{group}={name}: no such {group} preset; valid: {', '.join(group_options(group))}"
    m = re.search(r"full_key: (\S+)", cause)
    if "Value '" in cause and m:  # right key, wrong type
        return f"{m.group(1)}: {cause.splitlines()[0]}"
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' not in", msg)
    if m:
        key = m.group(1)
        path = key.split(".")
        schema = dict(zip(("run",) + GROUPS, (RunConfig, ModelConfig, DataConfig, TokenizerConfig,
                                               TrainerConfig, ParallelismConfig, ClusterConfig, LoggerConfig)))
        if path[0] in schema and len(path) == 2:
            valid = sorted(schema[path[0]].__dataclass_fields__)
            return f"unknown key '{key}'; valid keys in {path[0]}: {', '.join(valid)}"
        if path[0] not in schema:
            return f"unknown key '{key}'; valid top-level keys: {', '.join(schema)}"
    first = (cause or msg).splitlines()[0] if (cause or msg) else type(e).__name__
    return f"bad override ({' '.join(overrides) or 'none'}): {first}"


def validate(cfg: DictConfig) -> None:
    """Checks the types cannot express. Raises UserError naming the value and what is valid."""
    m, t, p, c, lg = cfg.model, cfg.trainer, cfg.parallelism, cfg.cluster, cfg.logger

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    need(m.n_heads % m.n_kv_heads == 0, f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    need((m.d_model // m.n_heads) % 2 == 0, f"head dim {m.d_model // m.n_heads} must be even for RoPE")
    need(t.max_steps > 0, f"trainer.max_steps={t.max_steps} must be > 0")
    need(t.micro_batch_size > 0, f"trainer.micro_batch_size={t.micro_batch_size} must be > 0")
    need(t.grad_accum_steps > 0, f"trainer.grad_accum_steps={t.grad_accum_steps} must be > 0")
    need(0 <= t.seq_len <= m.max_seq_len, f"trainer.seq_len={t.seq_len} must be in [0, model.max_seq_len={m.max_seq_len}]")
    need(t.precision in ("auto", "bf16", "fp32"), f"trainer.precision={t.precision}; valid: auto, bf16, fp32")
    need(t.warmup_steps >= 0 and t.lr > 0 and 0 <= t.min_lr <= t.lr,
         f"trainer.lr={t.lr}, trainer.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    need(p.zero_stage in (0, 1, 2, 3), f"parallelism.zero_stage={p.zero_stage}; valid: 0, 1, 2, 3")
    need(not p.offload_params or p.zero_stage == 3, "parallelism.offload_params=true needs parallelism.zero_stage=3")
    need(not p.offload_optimizer or p.zero_stage >= 1, "parallelism.offload_optimizer=true needs zero_stage >= 1")
    need(c.kind in ("process", "local", "ray"), f"cluster.kind={c.kind}; valid: process, local, ray")
    need(c.num_workers >= 1, f"cluster.num_workers={c.num_workers} must be >= 1")
    need(c.kind != "process" or c.num_workers == 1,
         f"cluster.num_workers={c.num_workers} needs Ray: use cluster=local (cluster=process runs one rank)")
    need(str(c.use_gpu).lower() in ("auto", "true", "false"), f"cluster.use_gpu={c.use_gpu}; valid: auto, true, false")
    need(c.max_failures >= 0, f"cluster.max_failures={c.max_failures} must be >= 0")
    need(lg.kind in ("none", "wandb"), f"logger.kind={lg.kind}; valid: none, wandb")
    need(lg.mode in ("auto", "online", "offline", "disabled"), f"logger.mode={lg.mode}; valid: auto, online, offline, disabled")
    need(cfg.data.source in ("stdlib", "files", "jsonl"), f"data.source={cfg.data.source}; valid: stdlib, files, jsonl")
    need(cfg.data.source == "stdlib" or len(cfg.data.paths) > 0, f"data.source={cfg.data.source} needs data.paths=[...]")
    need(0 < cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    tok = cfg.tokenizer
    need(tok.vocab_size >= 256 + len(tok.special_tokens),
         f"tokenizer.vocab_size={tok.vocab_size} must be >= 256 bytes + {len(tok.special_tokens)} special tokens")
    need(tok.vocab_size <= m.vocab_size, f"tokenizer.vocab_size={tok.vocab_size} exceeds model.vocab_size={m.vocab_size}")
    if t.global_batch_size:
        need(t.global_batch_size % (t.micro_batch_size * c.num_workers) == 0,
             f"trainer.global_batch_size={t.global_batch_size} is not a multiple of trainer.micro_batch_size="
             f"{t.micro_batch_size} × cluster.num_workers={c.num_workers}")
    r = t.resume
    need(r in ("auto", "never") or Path(r).exists(),
         f"trainer.resume={r}: no such checkpoint; valid: auto, never, or an existing checkpoint path")


def batch_plan(cfg: dict, world_size: int) -> dict:
    """Micro batch, accumulation and global batch for a world size.

    With global_batch_size pinned, accumulation adapts to the number of workers, so the
    tokens per optimizer step stay the same when a run moves from 2 workers to 1.
    """
    t = cfg["trainer"]
    micro = t["micro_batch_size"]
    if t["global_batch_size"]:
        glob = t["global_batch_size"]
        if glob % (micro * world_size):
            raise UserError(f"trainer.global_batch_size={glob} is not a multiple of micro_batch_size={micro} "
                            f"× workers={world_size}")
        accum = glob // (micro * world_size)
    else:
        accum = t["grad_accum_steps"]
        glob = micro * accum * world_size
    seq = t["seq_len"] or cfg["model"]["max_seq_len"]
    return {"micro_batch_size": micro, "grad_accum_steps": accum, "global_batch_size": glob,
            "seq_len": seq, "tokens_per_step": glob * seq}


def to_dict(cfg: DictConfig) -> dict:
    """The plain, fully resolved dict that workers get."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


SECRET_PATTERN = re.compile(r"(api[_-]?key|token|secret|password)", re.I)


def redact(obj: Any) -> Any:
    """Copy of a config dict with secret-looking keys masked (for saved configs and W&B)."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_PATTERN.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
