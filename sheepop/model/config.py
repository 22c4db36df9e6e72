"""The model's shape: one typed dataclass, the single definition sheepop has of it.

Hydra validates `conf/model/*.yaml` against it (sheepop.config registers it as the `model`
group's schema) and the Transformer is built from it; no torch import here, so the CLI can
check a config in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

# The token sheepop's BPE tokenizers put between documents (tokenizer.eot's default), and its
# padding token: the model's vocabulary contract with the data, export and generation.
EOT, PAD = "<|endoftext|>", "<|pad|>"

# model.activation_checkpointing: which blocks recompute their activations in backward (applied by
# sheepop.train.activation_checkpointing; the Transformer itself knows nothing of it).
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


def checkpointed_layers(n_layers: int, mode: str, every: int) -> range:
    """The blocks a mode checkpoints: full = all; selective = 0, every, 2·every, ... (here, not in
    the train package, so that `sheepop plan` counts the same blocks without importing it)."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing {mode}; valid: {', '.join(ACTIVATION_CHECKPOINTING)}")
    return range(0, n_layers if mode != "none" else 0, 1 if mode == "full" else every)


@dataclass
class ModelConfig:
    name: str = "custom"  # preset name, e.g. tiny, small, gpt2-124m, llama-7b
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
    activation_checkpointing: str = "none"  # none | full (every block) | selective (every k-th): less memory, ~1/3 more compute
    activation_checkpointing_every: int = 2  # selective: checkpoint blocks 0, k, 2k, ...

    # Fields that decide the shape of the weights (a checkpoint loads only into the same values).
    # max_seq_len only sizes the RoPE tables (not saved); init_std only matters before step 0.
    WEIGHT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "rope_theta",
                     "norm_eps", "tie_embeddings")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a saved config's `model` section (it may hold keys of other versions: ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
