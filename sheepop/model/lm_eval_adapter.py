"""sheepop's Transformer as a model of EleutherAI's lm-evaluation-harness (`lm_eval`, the `eval` extra).

`SheepopLM(model, tokenizer)` implements the harness's three requests on a sheepop model and its
tokenizer.json: `loglikelihood` (summed log-probabilities of a continuation given a context, and
whether greedy decoding would produce it; batched, the context cut from the left to the model's
max_seq_len), `loglikelihood_rolling` (a whole text in disjoint max_seq_len windows, for
perplexity tasks) and `generate_until` (greedy with the KV cache, stopping at any `until` string,
the end-of-text token or max_gen_toks).

`run_tasks` runs tasks shipped with sheepop (sheepop/eval_tasks/<name>/<name>.yaml + local JSONL,
loaded through lm_eval's TaskManager(include_path=...)) with nothing downloaded: the Hugging Face
offline switches are set before `datasets` is imported and the data files are local.
"""
from __future__ import annotations

import logging
import os
import tempfile

# Never reach a hub: set before lm_eval imports `datasets`, which reads these once at import time.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
os.environ.update(OFFLINE_ENV)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from sheepop.eval_tasks import TASKS_DIR  # noqa: E402
from sheepop.model.config import EOT  # noqa: E402
from sheepop.model.transformer import KVCache, Transformer  # noqa: E402

DEFAULT_MAX_GEN_TOKS = 256


class SheepopLM(LM):
    """A sheepop Transformer and its `tokenizers.Tokenizer` behind lm_eval's LM interface."""

    def __init__(self, model: Transformer, tokenizer, batch_size: int = 8, eot: str = EOT):
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_len = model.args.max_seq_len
        self._device = next(model.parameters()).device
        self.eot = eot  # the run's document separator (tokenizer.eot)
        eot_id = tokenizer.token_to_id(eot)
        # The harness scores an empty context from the end-of-text token (its prefix_token_id).
        self.eot_id = eot_id if eot_id is not None else 0
        self.has_eot = eot_id is not None

    # ----------------------------------------------------------------- helpers
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), as lm_eval's HF model does: trailing spaces of the
        context move to the continuation, the pair is encoded whole (so BPE merges across the
        boundary match what the model saw) and split where the context's own encoding ends."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        cont = whole[len(ctx):]
        if not cont:  # the context's last token absorbed the continuation: score it separately
            ctx, cont = ctx, self.encode(continuation)
        return (ctx or [self.eot_id]), cont

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) for token-id pairs.

        Each sequence keeps its last max_seq_len + 1 tokens (the context is cut from the left; a
        continuation longer than the window keeps its last max_seq_len tokens). Rows are right-
        padded into batches of batch_size, longest first: with causal attention padding after a
        row's tokens changes none of its logits."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            cont = cont[-self.max_len:]
            seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
            rows.append((i, seq[:-1], cont))
        rows.sort(key=lambda r: -len(r[1]))
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            width = len(batch[0][1])
            x = torch.tensor([inp + [0] * (width - len(inp)) for _, inp, _ in batch], device=self._device)
            logp = F.log_softmax(self.model(x).float(), dim=-1)
            for j, (i, inp, cont) in enumerate(batch):
                n = len(cont)
                lp = logp[j, len(inp) - n:len(inp)]  # the positions that predict the continuation
                target = torch.tensor(cont, device=self._device)
                out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    # -------------------------------------------------------------- lm_eval API
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self._split(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            ids = self.encode(r.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.eot_id, max_seq_len=self.max_len, context_len=1)]
            out.append(sum(lp for lp, _ in self.score(windows)))
        return out

    @torch.no_grad()
    def greedy_until(self, ids: list[int], until: list[str], max_gen_toks: int) -> str:
        """Greedy continuation of ids with the KV cache, cut before the first `until` string."""
        max_new = max(1, min(max_gen_toks, self.max_len - 1))
        ids = (list(ids) or [self.eot_id])[-(self.max_len - max_new):]
        cache = KVCache(self.model.args.n_layers, max_len=len(ids) + max_new)
        logits = self.model(torch.tensor([ids], device=self._device), cache=cache)
        new: list[int] = []
        text = ""
        for step in range(max_new):
            nxt = int(logits[0, -1].argmax())
            if self.has_eot and nxt == self.eot_id:
                break
            new.append(nxt)
            text = self.decode(new)
            if any(u and u in text for u in until):
                break
            if step + 1 < max_new:
                logits = self.model(torch.tensor([[nxt]], device=self._device), cache=cache)
        cut = min([text.find(u) for u in until if u and u in text], default=len(text))
        return text[:cut]

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if self.has_eot and self.eot not in until:
                until.append(self.eot)
            max_gen = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                logging.getLogger(__name__).warning("generate_until: sampling asked for; sheepop decodes greedily")
            out.append(self.greedy_until(self.encode(context), until, max_gen))
        return out

    def get_model_info(self) -> dict:
        a = self.model.args
        return {"model_name": getattr(a, "name", "sheepop"), "max_seq_len": a.max_seq_len,
                "vocab_size": a.vocab_size}


# ------------------------------------------------------------------ local tasks
def task_manager():
    """lm_eval's TaskManager over sheepop's shipped tasks only (the harness's own need a download)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def available_tasks() -> list[str]:
    return sorted(task_manager().all_tasks)


def _task_config(name: str, cache_dir: str) -> dict:
    """The task's YAML as a config dict, its relative data_files resolved beside the YAML."""
    import yaml

    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("task") != name:
            continue
        kw = dict(cfg.get("dataset_kwargs") or {})
        files = kw.get("data_files")
        if isinstance(files, dict):
            kw["data_files"] = {k: str(path.parent / v) for k, v in files.items()}
        elif isinstance(files, str):
            kw["data_files"] = str(path.parent / files)
        kw["cache_dir"] = cache_dir  # the converted dataset stays out of ~/.cache
        return {**cfg, "dataset_kwargs": kw}
    raise KeyError(name)


def run_tasks(model: Transformer, tokenizer, tasks: list[str], *, limit: int | None = None,
              batch_size: int = 8, num_fewshot: int | None = None, eot: str = EOT) -> dict:
    """lm_eval.simple_evaluate on shipped tasks; returns its results dict. Unknown names: KeyError
    naming them (the CLI turns it into one line listing the available tasks)."""
    from lm_eval import simple_evaluate

    os.environ.update(OFFLINE_ENV)
    tm = task_manager()
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise KeyError(", ".join(unknown))
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    lm = SheepopLM(model, tokenizer, batch_size=batch_size, eot=eot)
    import datasets

    datasets.disable_progress_bars()  # "Generating test split" for a local file says nothing
    with tempfile.TemporaryDirectory(prefix="sheepop-lm-eval-") as cache:
        return simple_evaluate(model=lm, tasks=[_task_config(t, cache) for t in tasks], task_manager=tm,
                               limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                               verbosity=None)


def result_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for each metric of each task in simple_evaluate's results."""
    rows = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, float(value), float(err) if isinstance(err, (int, float)) else None))
    return rows
