"""The Hugging Face mapping (sheepop.model.hf): transformers loads what write_hf writes and
computes what sheepop computes; `sheepop export`'s input checks. Exports of a trained run through
the CLI: tests/integration/test_export.py.

transformers and safetensors are test dependencies here (transformers only for the check)."""
from __future__ import annotations

import json

import pytest
import torch

from sheepop.model.config import ModelConfig
from sheepop.model.generate import generate
from sheepop.model.hf import write_hf
from sheepop.model.transformer import Transformer
from tests.helpers import one_error_line, sheepop

transformers = pytest.importorskip("transformers")


def hf_model(path):
    """A folder written by write_hf, loaded by transformers (fp32, eval mode) with its tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


TEXT = "def area(radius):\n    return 3.14159 * radius ** 2\n"


def test_random_untied_gqa_model_matches_logits_and_varied_greedy_tokens(tmp_path):
    """Untied head, grouped-query attention, a non-default rope_theta and a large init so the
    greedy tokens vary: every part of the mapping (incl. RoPE's layout) must be right."""
    from sheepop.data.tokenizer import train_bpe

    tok = train_bpe([TEXT] * 50, 300, ["<|endoftext|>", "<|pad|>"])
    torch.manual_seed(0)
    args = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=128,
                     rope_theta=5000.0, tie_embeddings=False, init_std=0.3)
    ours = Transformer(args).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in ours.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    write_hf(ours, tok, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2
    hf, _ = hf_model(tmp_path / "hf")
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
    write_hf(Transformer(ModelConfig(vocab_size=280, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)),
             tok, tmp_path / "hf", dtype="bf16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # the weights are as readable as the files beside them (safetensors alone would write 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


@pytest.mark.parametrize("args, needle", [
    (["format=onnx"], "format=onnx: unknown export format; valid: hf, pt"),
    (["dtype=fp8"], "dtype=fp8; valid: fp32, bf16"),
    ([], None),  # run dir without a checkpoint
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    r = sheepop("export", f"run.dir={empty}", f"out={tmp_path / 'o'}", *args)
    assert (needle or f"run.dir={empty}: no checkpoint found") in one_error_line(r)
    assert not (tmp_path / "o").exists()


def test_pt_export_refuses_an_existing_out_before_reading_the_run(tmp_path):
    """format=pt, like format=hf, never overwrites without --force (here not even a run is needed)."""
    taken = tmp_path / "model.pt"
    taken.write_text("keep me")
    r = sheepop("export", f"run.dir={tmp_path / 'no-run'}", "format=pt", f"out={taken}")
    assert f"out={taken} already exists; pass --force" in one_error_line(r)
    assert taken.read_text() == "keep me"
    r = sheepop("export", f"run.dir={tmp_path}", "format=pt", "dtype=bf16")
    assert "format=pt writes fp32 weights" in one_error_line(r)


def test_old_export_weights_command_names_its_replacement():
    """`export-weights` was folded into `export format=pt`: one line naming the new spelling, exit 2."""
    r = sheepop("export-weights", "run.dir=outputs/x", "out=/tmp/never-written.pt")
    line = one_error_line(r)
    assert "export-weights" in line and "sheepop export run.dir=DIR format=pt" in line, line
    assert r.stdout == ""
