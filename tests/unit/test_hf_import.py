"""Importing a Hugging Face Llama folder (sheepop.model.hf, checkpoint.load_hf, trainer.init_from,
`sheepop import`): the imported Transformer computes transformers' logits (GQA, tied and untied,
single-file and sharded safetensors), the round trip through the export mapping is exact, and
anything that is not a Llama is refused in one line. Models are tiny, random and built here; no
downloads. Training from imported weights: tests/integration/test_hf_import.py."""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from sheepop.config import compose
from sheepop.errors import UserError
from sheepop.model.config import ModelConfig
from sheepop.model.hf import model_config_from_hf, write_hf
from sheepop.model.transformer import Transformer
from sheepop.train.checkpoint import load_hf, load_model
from tests.helpers import one_error_line, sheepop

transformers = pytest.importorskip("transformers")
TEXT = "def area(radius):\n    return 3.14159 * radius ** 2\n"
VOCAB = 320


def tokenizer():
    from sheepop.data.tokenizer import train_bpe

    return train_bpe([TEXT] * 50, 300, ["<|endoftext|>", "<|pad|>"])


def save_llama(path, *, tie: bool, shard: bool = False, **overrides):
    """A random LlamaForCausalLM (fixed seed; large init and norms away from 1, so a wrong mapping
    shows) saved with save_pretrained, plus a tokenizer.json; returns the transformers model."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=160, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=tie, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides})).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path), safe_serialization=True, **({"max_shard_size": "50KB"} if shard else {}))
    tokenizer().save(str(path / "tokenizer.json"))
    return model


def imported(path) -> Transformer:
    model = Transformer(model_config_from_hf(json.loads((path / "config.json").read_text()), ModelConfig()))
    load_hf(model, path)
    return model.eval()


def max_diff(ours, hf, x) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


X = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie, shard", [(True, False), (False, False), (False, True)])
def test_imported_gqa_model_computes_transformers_logits(tmp_path, tie, shard):
    hf = save_llama(tmp_path, tie=tie, shard=shard)
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() == shard
    assert not shard or len(set(json.loads(index.read_text())["weight_map"].values())) > 1  # really sharded
    ours = imported(tmp_path)
    assert ours.args.n_kv_heads == 2 < ours.args.n_heads and ours.args.tie_embeddings == tie
    assert ours.args.rope_theta == 5000.0 and ours.args.max_seq_len == 128
    assert max_diff(ours, hf, X) < 1e-4


def test_round_trip_import_then_export_gives_transformers_the_same_logits(tmp_path):
    hf = save_llama(tmp_path / "in", tie=False)
    write_hf(imported(tmp_path / "in"), tokenizer(), tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(X).logits - hf(X).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters="),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported (sheepop imports the Llama architecture only); "
                             "valid: silu"),
    ({"head_dim": 32}, "head_dim=32 is not supported (sheepop imports the Llama architecture only); valid: "
                       "hidden_size / num_attention_heads = 16"),
])
def test_what_sheepop_would_compute_differently_is_refused_naming_the_key(change, needle):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 160, **change}
    with pytest.raises(UserError, match="valid: ") as e:
        model_config_from_hf(config, ModelConfig())
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_gpt2_folder_is_refused_in_one_line_by_import_and_train(tmp_path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)) \
        .save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    line = one_error_line(sheepop("import", str(tmp_path / "gpt2"), f"out={tmp_path / 'run'}"))
    assert "config.json: model_type='gpt2' is not supported" in line and "valid: llama" in line
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="no .*config.json; valid: hf:DIR"):
        compose(["trainer.init_from=hf:" + str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="trainer.init_from=/x; valid: '' \\(random init\\) or hf:DIR"):
        compose(["trainer.init_from=/x"])


def test_init_from_sets_the_model_and_tokenizer_and_refuses_a_shape_the_command_line_chose(tmp_path):
    save_llama(tmp_path, tie=False)
    cfg = compose([f"trainer.init_from=hf:{tmp_path}", "model.activation_checkpointing=full"])  # the default preset
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.max_seq_len) == (
        320, 64, 2, 4, 2, 160, 128)
    assert (m.rope_theta, m.norm_eps, m.tie_embeddings, m.activation_checkpointing) == (5000.0, 1e-5, False, "full")
    assert cfg.tokenizer.path == str(tmp_path / "tokenizer.json") and cfg.tokenizer.vocab_size == 320
    with pytest.raises(UserError, match=f"model.vocab_size=1024 but {tmp_path}/config.json has 320; .* drop "
                                        "model.vocab_size"):
        compose(["model=tiny", f"trainer.init_from=hf:{tmp_path}"])
    with pytest.raises(UserError, match="model.n_layers=5 but"):
        compose(["model.n_layers=5", f"trainer.init_from=hf:{tmp_path}"])
    with pytest.raises(UserError, match="but .*config.json has"):  # naming the default preset is a choice too
        compose(["model=small", f"trainer.init_from=hf:{tmp_path}"])


def test_missing_weights_or_a_missing_shard_is_one_line(tmp_path):
    save_llama(tmp_path, tie=True, shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(UserError, match="model.safetensors.index.json lists model-.*, which is not in"):
        compose([f"trainer.init_from=hf:{tmp_path}"])
    for f in tmp_path.glob("model*"):
        f.unlink()
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json"):
        compose([f"trainer.init_from=hf:{tmp_path}"])


def test_import_writes_a_folder_generate_reads(tmp_path):
    hf = save_llama(tmp_path / "hf", tie=True)
    r = sheepop("import", str(tmp_path / "hf"), f"out={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    ours, tok, meta = load_model(tmp_path / "run")
    assert meta["step"] == 0 and tok.to_str() == tokenizer().to_str()
    assert max_diff(ours, hf, X) < 1e-4
    r = sheepop("generate", f"run.dir={tmp_path / 'run'}", "max_new_tokens=5", "prompt=def ")
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr[-2000:]
    line = one_error_line(sheepop("import", str(tmp_path / "hf"), f"out={tmp_path / 'run'}"))
    assert "already exists and is not empty; pass --force" in line
    line = one_error_line(sheepop("eval", f"run.dir={tmp_path / 'run'}"))  # no data of its own to score
    assert "holds imported weights" in line and "pass data=..." in line


def test_the_plan_loads_imported_weights_on_a_fresh_start_only(tmp_path):
    """The driver decides: a fresh start gets the folder (absolute), a resume its checkpoint and no init_from."""
    from sheepop.driver.runner import make_plan

    save_llama(tmp_path / "hf", tie=True)
    cfg = compose([f"trainer.init_from=hf:{tmp_path / 'hf'}", "cluster=process"])
    assert make_plan(cfg, None, manifest={}).init_from == str(tmp_path / "hf")
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "zero_stage": cfg.parallelism.zero_stage}))
    plan = make_plan(cfg, str(ckpt), manifest={})
    assert plan.resume == str(ckpt) and plan.init_from is None


def test_the_driver_refuses_a_tokenizer_the_model_or_the_data_pipeline_cannot_use(tmp_path):
    from sheepop.data.tokenizer import train_bpe
    from sheepop.train.checkpoint import check_hf

    save_llama(tmp_path / "small", tie=True, vocab_size=280)  # its tokenizer.json has 287 tokens
    with pytest.raises(UserError, match="has 287 tokens, more than the model's vocab_size=280"):
        check_hf(compose([f"trainer.init_from=hf:{tmp_path / 'small'}"]))
    # No <|endoftext|>, and config.json's eos_token_id (LlamaConfig's default 2) is a plain byte token.
    save_llama(tmp_path / "no-eot", tie=True)
    train_bpe([TEXT] * 50, 300, ["<|pad|>"]).save(str(tmp_path / "no-eot" / "tokenizer.json"))
    cfg = compose([f"trainer.init_from=hf:{tmp_path / 'no-eot'}"])
    assert cfg.tokenizer.eot == "<|endoftext|>"
    with pytest.raises(UserError, match="tokenizer.eot=<\\|endoftext\\|>: not a token of this tokenizer, "
                                        "and sheepop puts it between documents; valid: .*'<\\|pad\\|>'"):
        check_hf(cfg)
    check_hf(cfg, training=False)  # sheepop import / generate do without it


def test_a_llama_tokenizer_without_endoftext_separates_documents_with_its_eos_token(tmp_path):
    """Llama's tokenizers end text with </s> or <|end_of_text|>, named by config.json's eos_token_id:
    that becomes tokenizer.eot, `prepare` puts it after every document, export names it."""
    from sheepop.data.shards import prepare
    from sheepop.data.tokenizer import train_bpe
    from sheepop.train.checkpoint import check_hf
    from tests.helpers.corpora import planted_corpus

    folder = tmp_path / "llama"
    save_llama(folder, tie=True, eos_token_id=1, bos_token_id=0)
    tok = train_bpe([TEXT] * 50, 300, ["<s>", "</s>", "<|pad|>"])
    tok.save(str(folder / "tokenizer.json"))
    cfg = compose([f"trainer.init_from=hf:{folder}", "data=files", f"data.paths=[{tmp_path / 'in'}]",
                   f"data.out_dir={tmp_path / 'data'}", "data.val_fraction=0.1"])
    assert cfg.tokenizer.eot == "</s>"
    from sheepop.config import redact

    assert redact(cfg)["tokenizer"]["eot"] == "</s>"  # saved configs keep it (a *_token key would be redacted)
    check_hf(cfg)
    # What the command line chose is kept, and refused when the tokenizer lacks it.
    assert compose([f"trainer.init_from=hf:{folder}", "tokenizer.eot='<s>'"]).tokenizer.eot == "<s>"
    with pytest.raises(UserError, match="tokenizer.eot=<eot>: not a token"):
        check_hf(compose([f"trainer.init_from=hf:{folder}", "tokenizer.eot='<eot>'"]))

    planted_corpus(tmp_path / "in", n_distinct=40, n_near=0, n_exact=0)
    m = prepare(cfg, log=lambda *_: None)
    assert m["tokenizer"]["eot_token"] == "</s>" and m["tokenizer"]["eot_id"] == 1
    tokens = sum(int((np.fromfile(tmp_path / "data" / s["file"], dtype=m["dtype"]) == 1).sum())
                 for split in m["splits"].values() for s in split["shards"])
    assert tokens == m["documents"] == 40  # one separator after each document, nothing else maps to it

    model = imported(folder)
    write_hf(model, tok, tmp_path / "export", eot="</s>")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["eos_token_id"] == 1
    assert json.loads((tmp_path / "export" / "special_tokens_map.json").read_text())["eos_token"] == "</s>"
