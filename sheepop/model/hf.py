"""The Hugging Face Llama format beside the model (torchtitan's `state_dict_adapter`).

sheepop's Transformer is Llama's architecture (RMSNorm, SwiGLU, grouped-query attention, RoPE),
so the mapping is a renaming of tensors. RoPE needs no permutation of the q/k weights: sheepop
rotates the (first half, second half) pairs of each head, which is HF Llama's `rotate_half`
layout (Meta's original checkpoints interleave pairs; HF's conversion script permutes those).

  out/model.safetensors        weights (fp32 by default); no lm_head when embeddings are tied
  out/config.json              LlamaConfig
  out/generation_config.json   eos / pad ids
  out/tokenizer.json           the run's byte-level BPE, unchanged
  out/tokenizer_config.json    tokenizer class and special tokens, for AutoTokenizer
  out/special_tokens_map.json

`write_hf` writes to a temporary folder renamed into place when complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
EOT, PAD = "<|endoftext|>", "<|pad|>"


def hf_state_dict(model) -> dict:
    """sheepop parameter names → HF Llama names (tensors contiguous, none shared)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(model.args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out.update({
            q + "self_attn.q_proj.weight": sd[p + "attn.wq.weight"],
            q + "self_attn.k_proj.weight": sd[p + "attn.wk.weight"],
            q + "self_attn.v_proj.weight": sd[p + "attn.wv.weight"],
            q + "self_attn.o_proj.weight": sd[p + "attn.wo.weight"],
            q + "mlp.gate_proj.weight": sd[p + "mlp.w1.weight"],
            q + "mlp.up_proj.weight": sd[p + "mlp.w3.weight"],
            q + "mlp.down_proj.weight": sd[p + "mlp.w2.weight"],
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
        })
    if not model.args.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    else:  # tied: HF re-ties lm_head to embed_tokens (tie_word_embeddings); safetensors refuses shared tensors
        out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def hf_config(args, tok, dtype: str) -> dict:
    eos, pad = tok.token_to_id(EOT), tok.token_to_id(PAD)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.d_ff,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta (and ignores the other).
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
        "bos_token_id": None,  # sheepop trains without a BOS token; documents are separated by EOT
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": DTYPES[dtype],  # transformers 4.x's key; 5.x reads "dtype"
        "dtype": DTYPES[dtype],
        "use_cache": True,
    }


def tokenizer_files(tok, max_seq_len: int) -> dict[str, dict]:
    specials = {}
    if tok.token_to_id(EOT) is not None:
        specials["eos_token"] = EOT
    if tok.token_to_id(PAD) is not None:
        specials["pad_token"] = PAD
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def write_hf(model, tok, out: Path, *, dtype: str = "fp32") -> None:
    """Write the HF folder for a sheepop Transformer and its tokenizers.Tokenizer, replacing `out`."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sd = hf_state_dict(model)
        if dtype == "bf16":
            sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config(model.args, tok, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        for name, content in tokenizer_files(tok, model.args.max_seq_len).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force: the old folder goes only once the new one is complete
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
