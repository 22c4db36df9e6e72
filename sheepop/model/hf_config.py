"""A Hugging Face Llama folder as configuration: its config.json as sheepop's ModelConfig, its
weight files, and trainer.init_from=hf:DIR applied at compose time.

No torch and nothing above the config layer here (sheepop.config calls it while it validates);
the tensor mapping both ways is sheepop.model.hf's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sheepop.errors import UserError
from sheepop.model.config import EOT, ModelConfig

if TYPE_CHECKING:
    from omegaconf import DictConfig


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


def init_from_folder(spec: str) -> Path:
    """The folder of trainer.init_from=hf:DIR, absolute (ranks may run in another working directory)."""
    if not spec.startswith("hf:") or not spec[3:]:
        raise UserError(f"trainer.init_from={spec}; valid: '' (random init) or hf:DIR (a local folder in the "
                        "Hugging Face Llama layout)")
    return Path(spec[3:]).expanduser().absolute()


# The model fields config.json decides (max_seq_len: max_position_embeddings, the RoPE positions it knows).
IMPORTED_FIELDS = (*ModelConfig.WEIGHT_FIELDS, "max_seq_len")


def apply_init_from(cfg: "DictConfig", chosen: set[str]) -> None:
    """trainer.init_from=hf:DIR, on the composed (resolved) DictConfig, for sheepop.config.validate: the
    model's shape becomes DIR/config.json's and tokenizer.path DIR/tokenizer.json (unless set). A shape
    field the command line chose (`chosen`: from a model=PRESET it named, or model.X=...) that
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
    for key in IMPORTED_FIELDS:
        ours, theirs = cfg.model[key], getattr(imported, key)
        if key in chosen and ours != theirs:  # the command line chose this value: it must agree
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
    cfg.tokenizer.eot = document_separator(cfg.tokenizer.path, cfg.tokenizer.eot, config)


def document_separator(tokenizer_json: str, eot_token: str, config_json: dict) -> str:
    """The token `prepare` puts between documents for an imported model: the configured one when the
    tokenizer has it (sheepop's own exports have <|endoftext|>), else the model's end-of-sequence
    token from config.json (Llama 2's </s>, Llama 3's <|end_of_text|>), which is what it saw
    between documents in pretraining. A tokenizer.eot the command line chose is kept (the
    driver's check names it when the tokenizer lacks it; <|endoftext|> is TokenizerConfig's default)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception:  # not a tokenizer: the driver's check (checkpoint.check_hf) says so in one line
        return eot_token
    eos = config_json.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # Llama 3.1 lists several; the first ends text
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    if eot_token != EOT or tok.token_to_id(eot_token) is not None or eos not in special:
        return eot_token
    return tok.id_to_token(eos)
