"""Sampling from a Transformer: greedy, temperature, top-k, top-p; with or without the KV cache.

With the cache the prompt is processed once (prefill) and every new token then costs a single
position; without it the whole sequence is re-run each step (kept for benchmarks and tests,
which check both paths pick the same greedy tokens).
"""
from __future__ import annotations

import warnings

import torch

from sheepop.model.config import EOT
from sheepop.model.transformer import KVCache, Transformer


class PromptError(ValueError):
    """A prompt the model cannot see as written (the CLI turns it into one line)."""


def encode_prompt(tok, prompt: str, vocab_size: int) -> list[int]:
    """Token ids of a prompt, or a PromptError naming the characters the tokenizer cannot encode.

    sheepop's byte-level BPE encodes any string; a tokenizer brought with tokenizer.path may
    not (no byte fallback): it drops characters or maps them to its unknown token. Either way
    the model would silently see a different prompt, so refuse instead.
    """
    unk = getattr(getattr(tok, "model", None), "unk_token", None)
    unk_id = tok.token_to_id(unk) if unk else None

    def lost(text: str) -> bool:
        ids = tok.encode(text, add_special_tokens=False).ids
        return tok.decode(ids, skip_special_tokens=False) != text or (unk_id is not None and unk_id in ids)

    ids = tok.encode(prompt, add_special_tokens=False).ids
    # Check character by character only when the whole prompt does not round-trip. Whitespace
    # is the pre-tokenizer's business (word-level tokenizers split on it and decode with spaces).
    bad = sorted({c for c in prompt if not c.isspace() and lost(c)}) if lost(prompt) else []
    if bad:
        shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in bad[:8])
        raise PromptError(f"prompt has characters outside the tokenizer's vocabulary: {shown}")
    outside = [t for t in ids if t >= vocab_size]
    if outside:
        raise PromptError(f"prompt encodes to ids {outside[:5]} outside the model's vocabulary of {vocab_size}")
    if not ids:
        raise PromptError("prompt is empty; give at least one character (e.g. prompt='def ')")
    return ids


def heal_prompt(tok, ids: list[int]) -> tuple[list[int], list[int] | None, str]:
    """Token healing: (prompt ids without their last token, the token ids the first new token
    may take, the text of the dropped token).

    BPE merges a trailing space or partial word into the next token during training ("def " is
    seen as "def" + " foo"), so a prompt that ends mid-token asks the model for a token boundary
    it rarely saw and the sample starts oddly (`def  3`). Backing up one token and letting the
    first new token be any token that starts with the dropped text repairs that boundary."""
    if len(ids) < 2:
        return ids, None, ""
    tail = tok.decode([ids[-1]])
    # Only where the prompt splits cleanly: a byte-level token holding part of a character decodes
    # to U+FFFD alone, and backing up over it would change the prompt's text.
    if not tail or "\ufffd" in tail or tok.decode(ids[:-1]) + tail != tok.decode(ids):
        return ids, None, ""
    allowed = [i for i in range(tok.get_vocab_size()) if tok.decode([i]).startswith(tail)]
    return ids[:-1], allowed or None, tail


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already cover top_p of the mass.
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, use_cache: bool = True, pad_id: int = 0,
             eos_id: int | None = None, seed: int | None = None,
             first_allowed: list[int] | None = None) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each (stopping at eos_id).

    first_allowed: the token ids the first new token is restricted to (token healing, see heal_prompt).

    Prompts of different lengths are left-padded; an attention mask hides the padding and
    positions count from each prompt's first real token, so a batched prompt generates
    the same tokens as the same prompt alone.
    """
    model.eval()
    device = next(model.parameters()).device
    ctx = model.args.max_seq_len
    budget = ctx - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in the context of {ctx}")
    if any(len(p) > budget for p in prompts):
        warnings.warn(f"prompt longer than {budget} tokens (context {ctx} - {max_new_tokens} new): keeping its last "
                      f"{budget}", stacklevel=2)
        prompts = [p[-budget:] for p in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    pads = torch.tensor([L - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    cache = KVCache(model.args.n_layers, max_len=L + max_new_tokens) if use_cache else None
    step_input = tokens
    for i_new in range(max_new_tokens):
        S = tokens.shape[1]  # keys visible so far
        T = step_input.shape[1]
        q_pos = torch.arange(S - T, S, device=device)
        keys = torch.arange(S, device=device)
        # (B, 1, T, S): causal and not padding; per-row positions start after the padding.
        mask = (keys[None, None, :] <= q_pos[None, :, None]) & (keys[None, None, :] >= pads[:, None, None])
        positions = (q_pos[None, :] - pads[:, None]).clamp(min=0)
        logits = model(step_input, cache=cache, positions=positions, mask=mask[:, None])
        last = logits[:, -1]
        if first_allowed is not None and i_new == 0:
            keep = torch.full_like(last, float("-inf"))
            keep[:, first_allowed] = 0.0
            last = last + keep
        nxt = sample_next(last, temperature, top_k, top_p, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        step_input = nxt[:, None] if use_cache else tokens
    if eos_id is not None:
        out = [o[: o.index(eos_id)] if eos_id in o else o for o in out]
    return out



def complete(model: Transformer, tok, ids: list[int], max_new_tokens: int, *, num_samples: int = 1,
             heal: bool = True, eot: str = EOT, **kwargs) -> list[str]:
    """Texts of `num_samples` continuations of the prompt ids (prompt included), each ending at the
    document separator `eot` (the run's tokenizer.eot), with token healing unless heal=False.
    kwargs go to generate (temperature, top_k, top_p, seed, ...)."""
    allowed = None
    if heal:
        ids, allowed, _ = heal_prompt(tok, ids)
    max_new_tokens = max(1, min(max_new_tokens, model.args.max_seq_len - len(ids) - 1))
    outs = generate(model, [ids] * num_samples, max_new_tokens, first_allowed=allowed,
                    eos_id=tok.token_to_id(eot), **kwargs)
    return [tok.decode(ids + out) for out in outs]
