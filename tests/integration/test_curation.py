"""`prepare` on 2 Ray Data workers (a real Ray on 127.0.0.1) writes the same bytes as on one
in-process worker. The in-process pipeline: tests/unit/test_curation.py."""
from __future__ import annotations

from sheepop.data import pipeline
from sheepop.data.shards import prepare
from tests.helpers.corpora import build_formats, cfg_for, planted_corpus


def test_two_ray_data_workers_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    planted_corpus(tmp_path / "in", n_distinct=150, n_near=10, n_exact=10)
    build_formats(tmp_path / "in" / "formats")
    monkeypatch.setattr(pipeline, "UNIT_BYTES", 30_000)
    one = prepare(cfg_for([tmp_path / "in"], tmp_path / "w1", "data.shard_tokens=20000"), log=lambda *_: None)
    two = prepare(cfg_for([tmp_path / "in"], tmp_path / "w2", "data.shard_tokens=20000", "data.num_workers=2",
                          "cluster=process"), log=lambda *_: None)
    assert two["num_workers"] == 2 and len(one["splits"]["train"]["shards"]) > 2
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir())
    for name in files:
        if name != "manifest.json":
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    for key in ("funnel", "splits", "tokenizer", "skipped", "removed_examples", "languages"):
        assert one[key] == two[key], key
    import ray

    assert not ray.is_initialized()  # prepare stopped the Ray it started
