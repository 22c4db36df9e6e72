"""`sheepop generate run.dir=DIR [prompt='def '] ...`: sample from a run's latest checkpoint (KV cache)."""
from __future__ import annotations

from sheepop.cli.args import parse_kv, require, wants_help
from sheepop.errors import UserError

OPTS = {"run.dir": str, "prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int,
        "top_p": float, "seed": int, "greedy": bool, "no_cache": bool, "num_samples": int, "heal": bool}
USAGE = ("usage: sheepop generate run.dir=DIR [prompt='def '] [max_new_tokens=100] [temperature=0.8] "
         "[top_k=40] [top_p=1.0] [greedy=true] [seed=0] [num_samples=1] [no_cache=true] [heal=false]\n"
         "  heal: token healing (default on): a prompt that ends mid-token, e.g. in a space, backs up one token\n"
         "  and the first new token must start with the text it dropped")
# temperature's ceiling: logits are float32, and past ~100 sampling is uniform anyway
RANGES = (("temperature", lambda v: 0 <= v <= 100, "in [0, 100] (0 = greedy)"), ("top_k", lambda v: v >= 0, ">= 0"),
          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("num_samples", lambda v: v >= 1, ">= 1"),
          ("max_new_tokens", lambda v: v >= 1, ">= 1"))


def main(argv: list[str]) -> int:
    if wants_help(argv):
        print(USAGE)
        return 0
    o = parse_kv(argv, OPTS, "generate")
    require(o, ("run.dir",), "generate needs a training run's folder or a checkpoint")
    for key, ok, valid in RANGES:
        if key in o and not ok(o[key]):
            raise UserError(f"{key}={o[key]}: must be {valid}")
    from sheepop.data.tokenizer import eot_token
    from sheepop.model.generate import PromptError, complete, encode_prompt
    from sheepop.train.checkpoint import load_model

    model, tok, meta = load_model(o["run.dir"])
    try:
        ids = encode_prompt(tok, o.get("prompt", "def "), model.args.vocab_size)
    except PromptError as e:
        raise UserError(str(e)) from None
    temperature = 0.0 if o.get("greedy") else o.get("temperature", 0.8)
    texts = complete(model, tok, ids, o.get("max_new_tokens", 100), num_samples=o.get("num_samples", 1),
                     heal=o.get("heal", True), eot=eot_token(meta["config"]), temperature=temperature, top_k=o.get("top_k", 40),
                     top_p=o.get("top_p", 1.0), seed=o.get("seed", 0), use_cache=not o.get("no_cache"))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} (step {meta['step']})")
        print(text)
    return 0
