"""Data mixtures (data.mixture): several corpora, each prepared on its own with `sheepop prepare`,
sampled by weight (sheepop.data.loader.MixtureWindows).

The driver loads and checks every source's manifest once (load_sources: it exists, every source
has the same tokenizer, the model's vocabulary holds it, each split holds a window) and hands the
result to the ranks in the RunPlan; each rank then verifies its copy of each source
(shards.verify_prepared), as it does for a single corpus. Nothing here prepares data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sheepop import storage
from sheepop.config import check_mixture, mixture_names
from sheepop.errors import UserError


@dataclass(frozen=True)
class PreparedSource:
    name: str  # metrics tokens/<name>, val_loss/<name>; the report
    out_dir: str  # the prepared folder (absolute path or URI)
    weight: float  # normalized: the sources' weights sum to 1
    manifest: dict  # its manifest.json, as the driver read it


def load_sources(cfg) -> list[PreparedSource]:
    """The driver's check of data.mixture: every source's manifest (a URI's tokenizer.json is
    fetched into the local cache, the shards are not), one tokenizer for all; one UserError line
    otherwise."""
    mixture = cfg.data.mixture
    check_mixture(mixture)
    names = mixture_names(mixture)
    total = sum(float(s.weight) for s in mixture)
    sources = []
    for i, (s, name) in enumerate(zip(mixture, names)):
        out = storage.normalize(s.out_dir)
        sources.append(PreparedSource(name=name, out_dir=out, weight=float(s.weight) / total,
                                      manifest=_read_manifest(out, i)))
    first = sources[0]
    tok0 = first.manifest["tokenizer"]
    for i, src in enumerate(sources[1:], 1):
        tok = src.manifest["tokenizer"]
        if tok.get("sha256_16") != tok0.get("sha256_16"):
            raise UserError(f"tokenizer mismatch across mixture sources: {src.name} ({src.out_dir}) has tokenizer "
                            f"{tok.get('sha256_16')}, {first.name} ({first.out_dir}) has {tok0.get('sha256_16')}; "
                            f"prepare every source with one tokenizer: `sheepop prepare data.out_dir={src.out_dir} "
                            f"tokenizer.path={first.out_dir}/tokenizer.json ...`")
    vocab = tok0.get("vocab_size", 0)
    if vocab > cfg.model.vocab_size:
        raise UserError(f"data.mixture: the sources' tokenizer has {vocab} tokens, model.vocab_size="
                        f"{cfg.model.vocab_size}; valid: model.vocab_size >= {vocab}")
    seq = cfg.trainer.seq_len or cfg.model.max_seq_len
    for src in sources:
        for split in ("train", "val"):
            longest = max((sh["tokens"] for sh in src.manifest["splits"][split]["shards"]), default=0)
            if longest < seq + 2:  # a window needs seq_len + 1 tokens and at least 1 start
                raise UserError(f"data.mixture source {src.name} ({src.out_dir}): its {split} split has no shard "
                                f"with a window of {seq + 1} tokens (longest: {longest}); add data to it or lower "
                                "trainer.seq_len")
    return sources


def _read_manifest(out: str, i: int) -> dict:
    how = f"prepare it first: `sheepop prepare data.out_dir={out} ...` (without data.mixture)"
    try:
        if storage.is_uri(out):
            manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
            from sheepop.data.shards import local_dir

            storage.download(out, local_dir(out), ["tokenizer.json"])  # the driver needs it, not the shards
            return manifest
        path = Path(out) / "manifest.json"
        if not path.is_file():
            raise UserError(f"data.mixture[{i}].out_dir={out}: no prepared data there (no manifest.json); {how}")
        return json.loads(path.read_text())
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"data.mixture[{i}].out_dir={out}: cannot read its manifest.json "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {how}") from None


def tokens_seen(windows, seed: int, steps: int, skip_steps, global_batch: int, seq_len: int) -> list[int]:
    """Tokens each source gave to the first `steps` optimizer steps of a run (its data windows
    after trainer.skip_steps): what a run logs as tokens/<name>, recomputed from (seed, step)."""
    import numpy as np

    from sheepop.data.loader import data_step

    counts = np.zeros(len(windows.sources), dtype=np.int64)
    for i in range(steps):
        counts += windows.source_counts(seed, data_step(i, skip_steps), global_batch)
    return [int(c) * seq_len for c in counts]
