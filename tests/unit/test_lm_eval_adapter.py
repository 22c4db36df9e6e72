"""sheepop's lm-evaluation-harness adapter (sheepop.model.lm_eval_adapter) on a tiny random model:
loglikelihood is the sum of log-softmax values of the model's own logits (batched or not, the
context cut from the left), is_greedy is right, generate_until stops at its strings and agrees
with sheepop's greedy generate, loglikelihood_rolling covers every token once, and the shipped
python_mc task runs through lm_eval.simple_evaluate with nothing downloaded.
The CLI on a trained run: tests/integration/test_eval.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from sheepop.data.tokenizer import train_bpe  # noqa: E402
from sheepop.model.config import ModelConfig  # noqa: E402
from sheepop.model.generate import generate  # noqa: E402
from sheepop.model.lm_eval_adapter import SheepopLM, available_tasks, result_rows, run_tasks  # noqa: E402
from sheepop.model.transformer import Transformer  # noqa: E402

CODE = "class Point(object):\n    def __init__(self, x, y):\n        self.x = x\n        return None\n"


@pytest.fixture(scope="module")
def tok():
    return train_bpe([CODE] * 20, 320, ["<|endoftext|>", "<|pad|>"])


@pytest.fixture(scope="module")
def model(tok):
    """Large init so greedy tokens vary (a trivial model would hide disagreements)."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=160,
                                   max_seq_len=48, init_std=0.4)).eval()


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The same quantity from one unbatched forward pass, by hand."""
    seq = (ctx + cont)[-(model.args.max_seq_len + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]])).float(), -1)[0]
    lp = logp[len(seq) - 1 - len(cont):]
    target = torch.tensor(cont)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_loglikelihood_is_the_sum_of_the_models_log_probs(model, tok):
    lm = SheepopLM(model, tok, batch_size=3)
    pairs = [("class Point(object", "):"), ("    def __init__(self", ", x, y):"), ("", "class"),
             ("        self.x = ", "x"), (CODE * 10, "        return None")]  # the last one is cut from the left
    assert len(lm.encode(pairs[-1][0])) > model.args.max_seq_len
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got):
        ctx, cont = lm._split(c, x)
        assert ctx + cont == (lm.encode(c + x) if c else [lm.eot_id] + lm.encode(x))
        want_lp, want_greedy = direct(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-5)
        assert greedy == want_greedy
        assert lp < 0
    # batching does not change a thing
    alone = SheepopLM(model, tok, batch_size=1).loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    assert [g[0] for g in got] == pytest.approx([a[0] for a in alone], abs=1e-5)


def test_is_greedy_true_for_the_models_own_greedy_tokens(model, tok):
    lm = SheepopLM(model, tok)
    ctx = lm.encode("    def __init__(self")
    own = generate(model, [ctx], 3)[0]
    lp, greedy = lm.score([(ctx, own)])[0]
    assert greedy and lp == pytest.approx(direct(model, ctx, own)[0], abs=1e-5)
    other = [(own[0] + 1) % 300] + own[1:]
    assert lm.score([(ctx, other)])[0][1] is False


def test_generate_until_matches_greedy_generate_and_stops_at_until(model, tok):
    lm = SheepopLM(model, tok)
    prompt = "class Point(object):\n    def"
    ids = lm.encode(prompt)
    full = tok.decode(generate(model, [ids], 20, eos_id=tok.token_to_id("<|endoftext|>"))[0])
    assert len(full) > 3
    # no stop string: the whole greedy continuation
    assert lm.generate_until([req("generate_until", prompt, {"until": ["@@never@@"], "max_gen_toks": 20})]) == [full]
    # a stop string taken from the middle of the continuation: cut just before it
    ascii_pairs = [full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].strip()]
    stop = ascii_pairs[len(ascii_pairs) // 2]
    out = lm.generate_until([req("generate_until", prompt, {"until": [stop], "max_gen_toks": 20})])[0]
    assert out == full[:full.index(stop)] and stop not in out
    # it stops generating there, not at max_gen_toks: count forward passes
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        lm.generate_until([req("generate_until", prompt, {"until": [full[:1]], "max_gen_toks": 20})])
    finally:
        h.remove()
    assert len(calls) <= 2


def test_loglikelihood_rolling_scores_every_token_once(model, tok):
    lm = SheepopLM(model, tok)
    text = CODE * 4  # longer than the 48-token context: several windows
    ids = lm.encode(text)
    assert len(ids) > 2 * model.args.max_seq_len
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    # window by window by hand: each token predicted once, from at most max_seq_len tokens before it
    L, want, seq = model.args.max_seq_len, 0.0, [lm.eot_id] + ids
    start = 0
    while start < len(ids):
        end = min(start + L, len(ids))
        ctx_from = max(0, end - L)  # full-length context for the last window
        want += direct(model, seq[ctx_from:start + 1], ids[start:end])[0]
        start = end
    assert got == pytest.approx(want, abs=1e-4)


def test_simple_evaluate_on_the_shipped_task_offline(model, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "python_mc" in available_tasks()
    results = run_tasks(model, tok, ["python_mc"], limit=4)
    acc = results["results"]["python_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results["results"]["python_mc"]["sample_len"] == 4
    rows = result_rows(results)
    assert [r[:2] for r in rows] == [("python_mc", "acc")] and rows[0][3] is not None
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    with pytest.raises(KeyError, match="nope"):
        run_tasks(model, tok, ["nope"], limit=1)


def test_results_go_to_the_runs_folder_never_into_a_checkpoint(tmp_path):
    from sheepop.cli.eval import _results_location, format_table

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000040"
    assert _results_location(str(run), str(ckpt)) == str(run)
    assert _results_location(str(ckpt), str(ckpt)) == str(run)
    assert _results_location(str(tmp_path / "imp"), str(tmp_path / "imp" / "model.pt")) == str(tmp_path / "imp")
    assert _results_location("s3://b/runs/r1", "s3://b/runs/r1/checkpoints/step_000010") == "s3://b/runs/r1"
    assert format_table([("python_mc", "acc", 0.5, 0.125)]).splitlines() == [
        "task       metric   value  stderr", "python_mc  acc     0.5000  0.1250"]
