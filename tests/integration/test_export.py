"""`sheepop export` on a real trained run: format=hf loads in transformers with identical logits
and greedy tokens; an existing target is refused unless --force. The mapping on random models
and the input checks: tests/unit/test_export.py."""
from __future__ import annotations

import pytest
import torch

from sheepop.model.generate import generate
from sheepop.train.checkpoint import load_model
from tests.helpers import one_error_line, sheepop, tiny_overrides

transformers = pytest.importorskip("transformers")
TEXT = "def area(radius):\n    return 3.14159 * radius ** 2\n"


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    r = sheepop("train", *tiny_overrides(run_dir, "trainer.max_steps=10", "trainer.eval_every=0"))
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def test_cli_export_loads_in_transformers_with_identical_logits(run, tmp_path):
    out = tmp_path / "hf"
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    ours, tok, _ = load_model(run)
    hf, hf_tok = hf_model(out)
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


@pytest.mark.parametrize("fmt, name", [("hf", "taken"), ("pt", "taken.pt")])
def test_existing_target_is_refused_unless_forced(run, tmp_path, fmt, name):
    out = tmp_path / name
    if fmt == "hf":
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    r = sheepop("export", f"run.dir={run}", f"format={fmt}", f"out={out}")
    assert f"out={out} already exists; pass --force" in one_error_line(r)
    assert (out / "precious.txt" if fmt == "hf" else out).read_text() == "keep me"
    r = sheepop("export", f"run.dir={run}", f"format={fmt}", f"out={out}", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    if fmt == "hf":
        assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    else:
        saved = torch.load(out, map_location="cpu", weights_only=False)
        assert saved["step"] == 10 and (out.parent / "tokenizer.json").is_file()
        assert {t.dtype for t in saved["model"].values()} == {torch.float32}


def test_the_run_and_its_checkpoints_are_never_export_targets_even_with_force(run, tmp_path):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run, run.parent, run / "checkpoints" / "hf"):
        r = sheepop("export", f"run.dir={run}", "format=hf", f"out={out}", "--force")
        assert "would replace the run being exported" in one_error_line(r) or "inside a run's checkpoints" in r.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_pt_export_keeps_another_tokenizer_beside_it_unless_forced(run, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"mine": true}')
    r = sheepop("export", f"run.dir={run}", "format=pt", f"out={tmp_path / 'model.pt'}")
    assert "tokenizer.json already exists (another tokenizer); pass --force" in one_error_line(r)
    assert (tmp_path / "tokenizer.json").read_text() == '{"mine": true}' and not (tmp_path / "model.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_damaged_newest_checkpoint_is_skipped_with_a_line_not_silently(run, tmp_path):
    """generate, eval and export read the newest intact checkpoint, and say which newer one they skipped."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpts = copy / "checkpoints"
    shutil.copytree(ckpts / "step_000010", ckpts / "step_000020")
    shard = sorted((ckpts / "step_000020").rglob("*model_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    r = sheepop("export", f"run.dir={copy}", "format=pt", f"out={tmp_path / 'model.pt'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipping checkpoint {ckpts / 'step_000020'}: " in r.stderr and "step 10" in r.stdout


def test_export_to_object_storage_uploads_and_keeps_its_refusals(run, s3, tmp_path, monkeypatch):
    """out=s3://...: written locally, then uploaded (it wrote a local folder named 's3:' before);
    an existing export needs --force, and --force leaves no file of the earlier export behind."""
    from sheepop import storage

    env = s3.env()
    bucket = s3.bucket("exports")
    hf = f"s3://{bucket}/small/hf"
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={hf}", env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {hf} "), r.stderr[-2000:]
    assert not (tmp_path / "s3:").exists()
    names = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # this process reads the bucket too
    storage._fs_cache.clear()
    storage.write_text(f"{hf}/stale.txt", "from an earlier export")
    assert names <= set(storage.sizes(hf))
    assert "already exists; pass --force" in one_error_line(sheepop("export", f"run.dir={run}", "format=hf",
                                                                    f"out={hf}", env=env))
    r = sheepop("export", f"run.dir={run}", "format=hf", f"out={hf}", "--force", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert names <= set(storage.sizes(hf)) and "stale.txt" not in storage.sizes(hf)
    r = sheepop("export", f"run.dir={run}", "format=pt", f"out=s3://{bucket}/small/pt/weights.pt", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(storage.sizes(f"s3://{bucket}/small/pt")) == {"weights.pt", "tokenizer.json"}
