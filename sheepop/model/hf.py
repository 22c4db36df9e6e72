"""The Hugging Face Llama format beside the model (torchtitan's `state_dict_adapter`), both ways.

sheepop's Transformer is Llama's architecture (RMSNorm, SwiGLU, grouped-query attention, RoPE),
so the mapping is a renaming of tensors, the same table (`hf_names`) for export and import. RoPE
needs no permutation of the q/k weights in either direction: sheepop rotates the (first half,
second half) pairs of each head, which is HF Llama's `rotate_half` layout, so a checkpoint in the
HF layout imports as it is (Meta's original checkpoints interleave pairs; HF's conversion script
permutes those, and sheepop reads only the HF layout).

Export (`sheepop export format=hf`):

  out/model.safetensors        weights (fp32 by default); no lm_head when embeddings are tied
  out/config.json              LlamaConfig
  out/generation_config.json   eos / pad ids
  out/tokenizer.json           the run's byte-level BPE, unchanged
  out/tokenizer_config.json    tokenizer class and special tokens, for AutoTokenizer
  out/special_tokens_map.json

`write_hf` writes to a temporary folder renamed into place when complete.

Import (`trainer.init_from=hf:DIR`, `sheepop import DIR`): `model_config_from_hf` reads config.json
and refuses, in one line naming the key, anything the Transformer would compute differently
(another architecture, RoPE scaling, biases, another activation or head_dim, quantized weights);
`read_safetensors` reads model.safetensors or the shards model.safetensors.index.json lists;
`from_hf_state_dict` renames and checks every name and shape. Loading into a model is
sheepop.train.checkpoint.load_hf's (the one place weights are loaded).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sheepop.errors import UserError
from sheepop.model.config import EOT, PAD, ModelConfig
from sheepop.model.hf_config import (IMPORTED_FIELDS, apply_init_from, init_from_folder,  # noqa: F401 (re-exported)
                                     model_config_from_hf, safetensors_files)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# sheepop's name → HF Llama's, inside one block (`layers.{i}.` ↔ `model.layers.{i}.`, each `.weight`).
LAYER_NAMES = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
               "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
               "mlp.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_names(args: ModelConfig) -> dict[str, str]:
    """Every sheepop parameter name → its HF Llama name. A tied head has no entry: HF re-ties lm_head to
    embed_tokens itself (tie_word_embeddings)."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{s}.weight": f"model.layers.{i}.{h}.weight" for s, h in LAYER_NAMES.items()})
    if not args.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    return names


def hf_state_dict(model) -> dict:
    """sheepop parameter names → HF Llama names (tensors contiguous, none shared)."""
    sd = model.state_dict()
    out = {hf: sd[ours].detach().contiguous() for ours, hf in hf_names(model.args).items()}
    if model.args.tie_embeddings:  # safetensors refuses tensors shared with the head
        out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def read_safetensors(folder: Path, *, shapes_only: bool = False) -> dict:
    """Every tensor of a HF folder, single file or sharded. shapes_only: meta tensors from the files'
    headers, nothing read (the driver's check before any rank starts)."""
    import torch
    from safetensors import safe_open

    out = {}
    for file in safetensors_files(Path(folder)):
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    out[k] = torch.empty(f.get_slice(k).get_shape(), device="meta") if shapes_only else f.get_tensor(k)
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a damaged file
            raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e!r})") \
                from None
    return out


def from_hf_state_dict(hf_sd: dict, args: ModelConfig, where: str = "the checkpoint") -> dict:
    """HF Llama names → sheepop's (the inverse of hf_state_dict), every name and shape checked against a
    Transformer of `args` (built on the meta device: nothing allocated). A tied model takes embed_tokens
    for its head, as transformers does, whether or not the file also holds an lm_head."""
    import torch

    from sheepop.model.transformer import Transformer

    names = hf_names(args)
    missing = [hf for hf in names.values() if hf not in hf_sd]
    if missing:
        raise UserError(f"{where}: no tensor {missing[0]} ({len(missing)} missing); valid: the tensors of a "
                        f"LlamaForCausalLM with tie_word_embeddings={str(args.tie_embeddings).lower()} and "
                        f"{args.n_layers} layers")
    # Checkpoints of older transformers also saved RoPE's inverse frequencies: computed, not weights.
    extra = [k for k in hf_sd if k not in names.values() and k != "lm_head.weight" and not k.endswith("inv_freq")]
    if extra:
        raise UserError(f"{where}: tensor {extra[0]} is not in sheepop's Llama ({len(extra)} such); valid: the "
                        f"tensors of a LlamaForCausalLM without biases, {args.n_layers} layers")
    sd = {ours: hf_sd[hf] for ours, hf in names.items()}
    if args.tie_embeddings:
        sd["head.weight"] = sd["tok_emb.weight"]
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    for ours, t in sd.items():
        if tuple(t.shape) != tuple(expected[ours].shape):
            raise UserError(f"{where}: {names.get(ours, ours)} has shape {tuple(t.shape)}, config.json's model needs "
                            f"{tuple(expected[ours].shape)}; valid: weights saved with that config.json")
    return sd


def hf_config(args, tok, dtype: str, eot: str = EOT) -> dict:
    eos, pad = tok.token_to_id(eot), tok.token_to_id(PAD)
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


def tokenizer_files(tok, max_seq_len: int, eot: str = EOT) -> dict[str, dict]:
    specials = {}
    if tok.token_to_id(eot) is not None:
        specials["eos_token"] = eot
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


def _as_umask_allows(path: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_hf(model, tok, out: Path, *, dtype: str = "fp32", eot: str = EOT) -> None:
    """Write the HF folder for a sheepop Transformer and its tokenizers.Tokenizer (eot: the run's
    document separator, HF's eos token), replacing `out`."""
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
        _as_umask_allows(tmp / "model.safetensors")  # safetensors writes 0600, unlike every file beside it
        config = hf_config(model.args, tok, dtype, eot)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        tok.save(str(tmp / "tokenizer.json"))
        for name, content in tokenizer_files(tok, model.args.max_seq_len, eot).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # --force: the old folder goes only once the new one is complete
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)
