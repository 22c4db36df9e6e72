"""A decoder-only transformer, readable top to bottom (Llama-style).

token embedding → N × [RMSNorm → grouped-query attention with RoPE → residual,
                       RMSNorm → SwiGLU MLP → residual] → RMSNorm → output head

Nothing here knows about DeepSpeed, Ray or W&B: the engine wraps this module.
"""
from __future__ import annotations

import math

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F

from sheepop.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even with bf16 weights or autocast: the mean of squares loses precision otherwise.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles at `positions` ((T,) or (B, T)) → (..., head_dim/2), in fp32.

    Computed in each forward rather than kept as buffers: a bf16 cast of the module (DeepSpeed's
    bf16 mode) would round stored angles, and (T × head_dim/2) cosines cost nothing next to a matmul."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's features; x: (B, H, T, D).

    The half-split layout is the one Hugging Face's Llama uses, so exported weights need no permutation.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    if cos.dim() == 2:  # (T, D/2): same positions for every row
        cos, sin = cos[None, None], sin[None, None]
    else:  # (B, T, D/2): per-row positions (left-padded generation)
        cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def document_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document RoPE positions (B, T) and attention mask (B, 1, T, T) from doc_ids (B, T).

    Query i may attend to key j when j <= i and both lie in the same document (block-diagonal
    causal). A query sees exactly the tokens of its document up to itself, so its position within
    the document is that count minus one: positions restart at 0 where each document starts."""
    T = doc_ids.shape[1]
    i = torch.arange(T, device=doc_ids.device)
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (i[None, :] <= i[:, None])
    return mask.sum(-1) - 1, mask[:, None]


class KVCache:
    """Keys and values of past positions for every layer, so each new token costs one position.

    The buffers (max_len positions) are allocated at the first update; each step writes its
    positions in place rather than concatenating a copy of the past.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    @property
    def length(self) -> int:
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full ({end} needed)")
        if self.k[layer] is None:
            B, H, _, D = k.shape
            self.k[layer], self.v[layer] = k.new_empty(B, H, self.max_len, D), v.new_empty(B, H, self.max_len, D)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if mask is None and k.shape[2] != T:
            # Decoding with a cache: new queries sit at the end, so query i sees keys <= past + i.
            past = k.shape[2] - T
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,  # K/V heads are shared by groups of queries
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, args: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(args.d_model, args.d_ff, bias=False)  # gate
        self.w3 = nn.Linear(args.d_model, args.d_ff, bias=False)  # up
        self.w2 = nn.Linear(args.d_ff, args.d_model, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args, layer)
        self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = SwiGLU(args)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelConfig):
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, std) init; residual output projections scaled by 1/sqrt(2·layers) (GPT-2)."""
        std = self.args.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at 1
            scale = 1 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
        """Logits (B, T, vocab), or the mean next-token cross-entropy when targets are given.

        positions: (T,) or (B, T) absolute positions (default: cache length onwards); mask: an optional
        boolean (B, 1, T, S) attention mask for padded batches, True = may attend.
        doc_ids: (B, T) document index of each position (data.document_mask; see
        sheepop.data.loader.document_ids): a token attends only to earlier tokens of its own
        document and RoPE positions restart at 0 in each; it replaces positions and mask (training
        and evaluation only: generation with a cache leaves it None).
        """
        T = idx.shape[1]
        if doc_ids is not None:
            positions, mask = document_attention(doc_ids)
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device)
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)
        x = self.tok_emb(idx)
        for block in self.layers:
            x = block(x, cos, sin, cache, mask)
        if targets is None:
            return self.head(self.norm(x))
        return chunked_cross_entropy(self.head, self.norm(x), targets)


LOSS_CHUNK_BYTES = 1 << 25  # fp32 logits per chunk of the loss: 32 MiB
LOSS_CHUNK_MIN_TOKENS = 1024  # however large the vocabulary


def chunked_cross_entropy(head: nn.Linear, h: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of head(h) in fp32, a chunk of tokens at a time.

    The same sum as one cross_entropy over all tokens; in chunks, no single tensor is the whole
    batch's logits (micro 8 x 256 tokens x 8,192 vocab = 67 MB in fp32). A CPU process's malloc
    keeps freed blocks of up to 64 MB for the next step on any thread, but maps a larger block
    afresh on a thread other than the main one (a Ray Train worker's; sheepop.cpu_allocator):
    `cluster=local` 454 -> 432 ms a step with `model=small` (bench/RESULTS.md). At least
    1,024 tokens a chunk, so a large vocabulary (on a GPU) is not cut into many small matmuls."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    # out_features, not weight.shape: under ZeRO-3 an untied head's weight is an empty partition here
    chunk = chunk_tokens or max(LOSS_CHUNK_MIN_TOKENS, LOSS_CHUNK_BYTES // (4 * head.out_features))
    total = sum(F.cross_entropy(head(hc).float(), tc, ignore_index=-100, reduction="sum")
                for hc, tc in zip(h.split(chunk), targets.split(chunk)))
    return total / (targets != -100).sum().clamp(min=1)


def num_params(args: ModelConfig, embedding: bool = True) -> int:
    """Parameter count from the shape alone (no allocation), so `plan` works for 7B on a laptop."""
    d, hd = args.d_model, args.head_dim
    attn = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2
    mlp = 3 * d * args.d_ff
    per_layer = attn + mlp + 2 * d
    body = args.n_layers * per_layer + d
    emb = args.vocab_size * d * (1 if args.tie_embeddings else 2)
    return body + (emb if embedding else (0 if args.tie_embeddings else args.vocab_size * d))


def flops_per_token(args: ModelConfig, seq_len: int, attended: float | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), PaLM appendix B style:
    6 × non-embedding params (the output head counts) + 12 · layers · d · seq for attention scores.

    attended: with data.document_mask, the attention span that replaces seq (document_attended:
    each window's Σ document length² / seq_len, as PaLM counts a window's full seq² square); the
    loop computes it per step for MFU. None: the whole window (the figure before any data is seen,
    an upper bound with the mask)."""
    matmul_params = num_params(args, embedding=False) + (args.vocab_size * args.d_model if args.tie_embeddings else 0)
    return 6 * matmul_params + 12 * args.n_layers * args.d_model * (seq_len if attended is None else attended)


def document_attended(doc_ids: torch.Tensor) -> float:
    """The attention span flops_per_token counts for windows with document masks, from doc_ids
    (B, T): a window of documents of lengths n_i has Σ n_i² query-key pairs where an unmasked one
    has T², so its span is Σ n_i² / T (T for a single document); the mean over the B windows."""
    B, T = doc_ids.shape  # host arithmetic on the loader's ids (numpy): it never waits for a device
    ids = doc_ids.cpu().numpy() + T * np.arange(B)[:, None]  # each window's documents numbered apart
    lengths = np.bincount(ids.ravel(), minlength=B * T).astype(np.float64)
    return float((lengths ** 2).sum() / (B * T))
