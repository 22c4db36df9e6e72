"""`sheepop generate` (and `sheepop export format=pt`) on a real trained run: prompts the
run's tokenizer cannot encode, bad sampling options and unwritable export paths are one line
each. The generation logic itself: tests/unit/test_generate.py."""
from __future__ import annotations

import shutil

from tests.helpers import letters_only_tokenizer, one_error_line, sheepop, tiny_overrides


def test_cli_refuses_a_prompt_outside_the_vocabulary(tmp_path):
    """A real run whose checkpoint carries a tokenizer without byte fallback: one error line; so do
    bad sampling options and an export path that cannot be written."""
    run = tmp_path / "run"
    r = sheepop("train", *tiny_overrides(run, "trainer.max_steps=4", "trainer.eval_every=0"))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = next((run / "checkpoints").iterdir())
    shutil.rmtree(ckpt / "done")  # the test swaps files in the checkpoint: no manifest to contradict
    shutil.copy(ckpt / "tokenizer.json", tmp_path / "orig.json")
    letters_only_tokenizer().save(str(ckpt / "tokenizer.json"))
    r = sheepop("generate", f"run.dir={run}", "prompt=def fé", "max_new_tokens=5")
    assert "prompt has characters outside the tokenizer's vocabulary: 'é'" in one_error_line(r)
    # Bad sampling options and an unwritable export path: one line each, the value named.
    for args, message in ((["temperature=-1"], "temperature=-1.0: must be in [0, 100]"), (["top_p=1.5"], "top_p=1.5: must be in"),
                          (["num_samples=0"], "num_samples=0: must be >= 1")):
        r = sheepop("generate", f"run.dir={run}", *args)
        assert message in one_error_line(r)
    (tmp_path / "a_file").write_text("")
    r = sheepop("export", f"run.dir={run}", "format=pt", f"out={tmp_path}/a_file/model.pt")
    assert f"{tmp_path}/a_file is a file, not a folder" in one_error_line(r)
    shutil.copy(tmp_path / "orig.json", ckpt / "tokenizer.json")  # the byte-level one takes anything
    r = sheepop("generate", f"run.dir={run}", "prompt=def fé", "max_new_tokens=5", "greedy=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def fé")
