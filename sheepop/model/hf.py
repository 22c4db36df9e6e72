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

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sheepop.errors import UserError
from sheepop.model.config import ModelConfig

if TYPE_CHECKING:
    from omegaconf import DictConfig

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
EOT, PAD = "<|endoftext|>", "<|pad|>"


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


def model_config_from_hf(config_json: dict, base: ModelConfig, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of a HF Llama config.json: its shape on top of `base` (which keeps what HF does
    not say: name, init_std, activation checkpointing). Anything the Transformer would compute
    differently is refused in one line naming the key and what sheepop accepts."""
    c = config_json

    def need(ok: bool, key: str, valid: str) -> None:
        if not ok:
            raise UserError(f"{where}: {key}={c.get(key)!r} is not supported (sheepop imports the Llama "
                            f"architecture only); valid: {valid}")

    need(c.get("model_type") == "llama", "model_type", "llama")
    need(c.get("architectures") in (None, ["LlamaForCausalLM"]), "architectures", '["LlamaForCausalLM"]')
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        need(isinstance(c.get(key), int) and c[key] >= 1, key, "a positive integer")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads  # absent: plain multi-head attention (LlamaConfig's default)
    need(d % heads == 0 and (d // heads) % 2 == 0, "num_attention_heads", f"a divisor of hidden_size={d} "
         "leaving an even head_dim")
    need(heads % kv == 0, "num_key_value_heads", f"a divisor of num_attention_heads={heads}")
    need(c.get("head_dim") in (None, d // heads), "head_dim", f"hidden_size / num_attention_heads = {d // heads}")
    need(c.get("hidden_act", "silu") == "silu", "hidden_act", "silu (SwiGLU)")
    need(not c.get("attention_bias") and not c.get("mlp_bias"),
         "attention_bias" if c.get("attention_bias") else "mlp_bias", "false (sheepop's linear layers have no bias)")
    need(not c.get("rope_scaling"), "rope_scaling", "null (sheepop's RoPE has no scaling)")
    rope = c.get("rope_parameters") or {}  # transformers >= 5 keeps theta and any scaling here
    need(rope.get("rope_type", "default") == "default", "rope_parameters",
         '{"rope_type": "default", "rope_theta": ...} (sheepop\'s RoPE has no scaling)')
    need(not c.get("quantization_config"), "quantization_config", "absent (unquantized weights)")
    return dataclasses.replace(
        base, vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=kv,
        d_ff=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),  # absent keys take LlamaConfig's defaults
        tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists (no torch: compose checks this)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if not index.is_file():
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json; valid: a folder saved "
                        "by save_pretrained(safe_serialization=True) (pytorch_model.bin is not read)")
    try:
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"{index}: not a safetensors index; valid: JSON with a weight_map of tensor → file") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{index} lists {missing[0]}, which is not in {folder} ({len(missing)} missing)")
    return files


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


def init_from_folder(spec: str) -> Path:
    """The folder of trainer.init_from=hf:DIR, absolute (ranks may run in another working directory)."""
    if not spec.startswith("hf:") or not spec[3:]:
        raise UserError(f"trainer.init_from={spec}; valid: '' (random init) or hf:DIR (a local folder in the "
                        "Hugging Face Llama layout)")
    return Path(spec[3:]).expanduser().absolute()


# The model fields config.json decides (max_seq_len: max_position_embeddings, the RoPE positions it knows).
IMPORTED_FIELDS = (*ModelConfig.WEIGHT_FIELDS, "max_seq_len")


def apply_init_from(cfg: "DictConfig") -> None:
    """trainer.init_from=hf:DIR, on the composed (resolved) DictConfig, for sheepop.config.validate: the
    model's shape becomes DIR/config.json's and tokenizer.path DIR/tokenizer.json (unless set). A shape
    field the command line chose (a model=PRESET other than the default one, or model.X=...) that
    disagrees with config.json is refused. No torch here: compose stays fast."""
    folder = init_from_folder(cfg.trainer.init_from)
    config_json = folder / "config.json"
    if not config_json.is_file():
        raise UserError(f"trainer.init_from={cfg.trainer.init_from}: no {config_json}; valid: hf:DIR, a folder "
                        "written by save_pretrained (config.json, model.safetensors, tokenizer.json)")
    try:
        config = json.loads(config_json.read_text())
    except ValueError as e:
        raise UserError(f"{config_json}: not JSON ({e})") from None
    imported = model_config_from_hf(config, ModelConfig(), where=str(config_json))
    safetensors_files(folder)
    default = _default_model()
    for key in IMPORTED_FIELDS:
        ours, theirs = cfg.model[key], getattr(imported, key)
        if ours != default[key] and ours != theirs:  # the command line chose this value: it must agree
            raise UserError(f"model.{key}={ours} but {config_json} has {theirs}; the shape comes from "
                            f"trainer.init_from: drop model.{key} (or the model=... preset)")
        cfg.model[key] = theirs
    cfg.trainer.init_from = f"hf:{folder}"
    if not cfg.tokenizer.path:
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"trainer.init_from={cfg.trainer.init_from}: no {folder / 'tokenizer.json'}; valid: a "
                            "folder with the model's tokenizer.json, or tokenizer.path=FILE")
        cfg.tokenizer.path = str(folder / "tokenizer.json")
    cfg.tokenizer.vocab_size = cfg.model.vocab_size  # its interpolation was resolved with the preset's size


def _default_model() -> dict:
    """The model fields `sheepop train` has without any model override: the default preset's."""
    from omegaconf import OmegaConf

    from sheepop.config import conf_dir

    defaults = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"))["defaults"]
    name = next(d["model"] for d in defaults if isinstance(d, dict) and "model" in d)
    preset = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / f"{name}.yaml"))
    return {**dataclasses.asdict(ModelConfig()), **preset}


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
