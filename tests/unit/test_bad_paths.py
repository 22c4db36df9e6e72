"""Paths the config names are checked before anything starts: one line naming the value."""
from __future__ import annotations

from tests.helpers import one_error_line, sheepop


def test_run_dir_that_cannot_be_written(tmp_path):
    line = one_error_line(sheepop("train", "model=tiny", "run.dir=/proc/sheepop-cannot/run"))
    assert "run.dir=/proc/sheepop-cannot/run: cannot write there" in line


def test_tokenizer_file_that_is_not_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    line = one_error_line(sheepop("prepare", "model=tiny", f"tokenizer.path={bad}", f"data.out_dir={tmp_path}/d"))
    assert f"tokenizer.path={bad}: not a tokenizer.json the tokenizers library can read" in line
    assert not (tmp_path / "d").exists()  # nothing prepared


def test_storage_endpoint_that_does_not_answer(tmp_path):
    from sheepop.net import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = sheepop("train", "model=tiny", f"run.dir={tmp_path}/run", "cluster.storage_path=s3://nope/x",
                env={"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                     "AWS_EC2_METADATA_DISABLED": "true"})
    line = one_error_line(r)
    assert f"cluster.storage_path=s3://nope/x: cannot reach the S3 endpoint {endpoint}" in line


def test_more_local_workers_than_cpus_fail_before_ray_starts(tmp_path):
    line = one_error_line(sheepop("train", "model=tiny", f"run.dir={tmp_path}/run", "cluster=local",
                                  "cluster.num_workers=64", "trainer.global_batch_size=0"))
    assert "cluster.num_workers=64 × 1 CPU(s) each needs 64 CPUs; cluster=local has" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing started


def test_bench_script_with_a_bad_option_says_so_in_one_line():
    """bench/ scripts read key=value options like the CLI: a typo is one line naming the valid keys."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    for args, expected in ((["runz=3"], "unknown option 'runz'; valid for bench/startup.py: model, runs, kinds"),
                           (["runs=x"], "bench/startup.py: runs=x: expected int")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "startup.py"), *args], capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.strip() == expected, r.stderr


def test_run_dir_that_is_someone_elses_folder_or_inside_the_data_is_refused(tmp_path):
    """A config.yaml that is not a sheepop run's would be overwritten; a run.dir inside data.out_dir
    would go when the data is prepared again; an empty run.dir would scatter the run in the cwd."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("database: postgres\n")
    line = one_error_line(sheepop("train", "model=tiny", f"run.dir={theirs}"))
    assert f"run.dir={theirs} has a config.yaml that is not a sheepop run's" in line
    assert (theirs / "config.yaml").read_text() == "database: postgres\n"
    line = one_error_line(sheepop("train", "model=tiny", f"run.dir={tmp_path}/data/run", f"data.out_dir={tmp_path}/data"))
    assert f"run.dir={tmp_path}/data/run is inside data.out_dir={tmp_path}/data" in line
    assert "run.dir= is empty" in one_error_line(sheepop("train", "model=tiny", "run.dir="))


def test_data_out_dir_of_other_files_is_refused_before_the_run_starts(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    line = one_error_line(sheepop("train", "model=tiny", f"run.dir={tmp_path}/run", f"data.out_dir={tmp_path}/notes"))
    assert f"data.out_dir={tmp_path}/notes holds files that are not prepared data" in line
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and not (tmp_path / "run" / "config.yaml").exists()


def test_a_corpus_too_small_for_one_window_is_one_line_before_any_rank_starts(tmp_path):
    import json

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"def f{i}(a):\n    return a + {i}\n" * 2}) + "\n" for i in range(3)))
    r = sheepop("train", "model=tiny", "cluster=process", "logger=none", f"run.dir={tmp_path}/run", "data=jsonl",
                f"data.paths=[{docs}]", f"data.out_dir={tmp_path}/prepared")
    assert "too few for one window of 129 (trainer.seq_len=128 + 1)" in one_error_line(r)
    assert not (tmp_path / "run" / "config.yaml").exists()  # the run did not start
