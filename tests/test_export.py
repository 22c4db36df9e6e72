"""`sheepop export format=hf`: transformers loads the folder and computes what sheepop computes.

transformers and safetensors are test dependencies here (transformers only for the check)."""
from __future__ import annotations

import json

import pytest
import torch

from sheepop.export import write_hf
from sheepop.model import ModelArgs, Transformer
from sheepop.model.generate import generate
from sheepop.train.checkpoint import load_model
from tests.conftest import sheepop, tiny_overrides

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    r = sheepop("train", *tiny_overrides(run_dir, "trainer.max_steps=10", "trainer.eval_every=0"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def _hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


TEXT = "def area(radius):\n    return 3.14159 * radius ** 2\n"


@pytest.mark.slow
def test_cli_export_loads_in_transformers_with_identical_logits(run, tmp_path):
    out = tmp_path / "hf"
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    ours, tok, _ = load_model(run)
    hf, hf_tok = _hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = tok.encode(TEXT).ids
    assert hf_tok(TEXT)["input_ids"] == ids and hf_tok.decode(ids) == TEXT
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff < 1e-4
    # Greedy continuation through HF's own generate loop and KV cache.
    new = generate(ours, [ids], 20)[0]
    theirs = hf.generate(x, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert new[:len(theirs)] == theirs


def test_random_untied_gqa_model_matches_logits_and_varied_greedy_tokens(tmp_path):
    """Untied head, grouped-query attention, a non-default rope_theta and a large init so the
    greedy tokens vary: every part of the mapping (incl. RoPE's layout) must be right."""
    from sheepop.data.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 50, 300, ["<|endoftext|>", "<|pad|>"])
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=128,
                     rope_theta=5000.0, tie_embeddings=False, init_std=0.3)
    ours = Transformer(args).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    write_hf(ours, tok, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2
    hf, _ = _hf(tmp_path / "hf")
    x = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
    prompt = x[:1, :10]
    new = generate(ours, prompt.tolist(), 40)[0]
    theirs = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, 10:].tolist()
    assert len(set(new)) > 10 and new == theirs


def test_bf16_export_is_bf16(tmp_path):
    from safetensors import safe_open

    from sheepop.data.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 20, 280, ["<|endoftext|>", "<|pad|>"])
    write_hf(Transformer(ModelArgs(vocab_size=280, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)),
             tok, tmp_path / "hf", dtype="bf16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


@pytest.mark.slow
def test_existing_target_is_refused_unless_forced(run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={out}")
    assert r.returncode == 2 and f"out={out} already exists; pass --force" in r.stderr
    assert "Traceback" not in r.stderr and (out / "precious.txt").read_text() == "keep me"
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={out}", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("args, needle", [
    (["format=onnx"], "format=onnx: unknown export format; valid: hf"),
    (["dtype=fp8"], "dtype=fp8; valid: fp32, bf16"),
    ([], None),  # run dir without a checkpoint
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = sheepop("export", f"run.dir={empty}", f"out={tmp_path / 'o'}", *args)
    assert r.returncode == 2
    assert (needle or f"run.dir={empty}: no checkpoint found") in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
