"""Paths a command is about to write (sheepop.output_paths, and where the commands use it): checked
before any work, refused in one line, and nothing the user has is replaced by accident. Also the
strict key=value values every reading command shares (sheepop.cli.args)."""
from __future__ import annotations

import pytest

from sheepop import output_paths
from sheepop.cli.args import parse_kv
from sheepop.errors import UserError
from tests.helpers import one_error_line, sheepop


def refused(raw, **kw) -> str:
    with pytest.raises(UserError) as e:
        output_paths.check(raw, "out", **kw)
    return str(e.value)


def test_a_path_is_checked_for_what_it_will_be_and_where_it_lies(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "already exists; pass --force" in refused(a_file, kind="file")
    assert output_paths.check(a_file, "out", kind="file", force=True) == a_file
    assert "is a file; give a folder" in refused(a_file, kind="folder", force=True)
    assert "is a folder; give a file path" in refused(tmp_path, kind="file", force=True)
    assert f"{a_file} is a file, not a folder" in refused(a_file / "x" / "y.pt", kind="file")
    assert "names a folder; give a file path" in refused(f"{tmp_path}/new/", kind="file")
    assert "is empty" in refused("", kind="folder")
    assert output_paths.check(tmp_path / "new" / "deeper", "out", kind="folder") == tmp_path / "new" / "deeper"
    assert a_file.read_text() == "keep me"


def test_kept_paths_are_never_replaced_and_protected_folders_never_written_into(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    keep = ((run, "the run"),)
    inside = ((run / "checkpoints", "its checkpoints"),)
    for target in (run, tmp_path / "runs", tmp_path):  # the run itself, or a folder that holds it
        assert "would replace the run" in refused(target, kind="folder", force=True, keep=keep)
    assert "is inside its checkpoints" in refused(run / "checkpoints" / "x", kind="folder", force=True,
                                                  not_inside=inside)
    assert output_paths.check(run / "hf", "out", kind="folder", keep=keep, not_inside=inside) == run / "hf"


@pytest.mark.parametrize("spec, value, needle", [
    ({"greedy": bool}, "greedy=maybe", "greedy=maybe: expected true or false"),
    ({"heal": bool}, "heal=xyz", "heal=xyz: expected true or false"),
    ({"temperature": float}, "temperature=inf", "temperature=inf: expected a finite number"),
    ({"temperature": float}, "temperature=nan", "temperature=nan: expected a finite number"),
    ({"top_k": int}, "top_k=1.5", "top_k=1.5: expected int"),
])
def test_a_value_that_is_not_of_its_type_is_refused_not_read_as_false(spec, value, needle):
    with pytest.raises(UserError) as e:
        parse_kv([value], spec, "generate")
    assert needle in str(e.value)


def test_booleans_take_the_usual_spellings():
    spec = {"a": bool, "b": bool, "c": bool}
    assert parse_kv(["a=on", "b=No", "--c"], spec, "x") == {"a": True, "b": False, "c": True}


@pytest.mark.parametrize("args, needle", [
    (["generate", "run.dir=RUN", "temperature=1e300"], "temperature=1e+300: must be in [0, 100]"),
    (["eval", "run.dir=RUN", "seq_len=0"], "seq_len=0: must be >= 1"),
    (["eval", "run.dir=RUN", "max_tokens=0"], "max_tokens=0: must be >= 1"),
    (["eval", "run.dir=RUN", "tasks=python_mc", "num_fewshot=-1"], "num_fewshot=-1: must be >= 0"),
    (["eval", "run.dir=RUN", "tasks=python_mc", "out=RUN"], "out=RUN is a folder; give a file path"),
    (["eval", "run.dir=RUN", "tasks=python_mc", "out=RUN/taken.json"], "already exists; pass --force"),
    (["watch", "RUN", "poll=-1"], "poll=-1.0: must be > 0 seconds"),
    (["report", "RUN", "out=RUN/taken.json"], "taken.json is a file; give a folder"),
    (["import", "RUN", "out=RUN/taken.json/x"], "taken.json is a file, not a folder"),
    (["export", "run.dir=RUN", "format=hf", "out=RUN", "--force"], "would replace the run being exported"),
    (["export", "run.dir=RUN", "format=hf", "out=RUN/checkpoints/hf", "--force"], "is inside a run's checkpoints"),
    (["export", "run.dir=RUN", "format=pt", "out=RUN/new/"], "names a folder; give a file path"),
])
def test_commands_refuse_bad_values_and_outputs_in_one_line_before_reading_the_run(tmp_path, args, needle):
    """The run folder here holds no checkpoint: each refusal comes before anything is read."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "taken.json").write_text("keep me")
    (run / "metrics.jsonl").write_text("")
    r = sheepop(*[a.replace("RUN", str(run)) for a in args])
    assert needle.replace("RUN", str(run)) in one_error_line(r)
    assert (run / "taken.json").read_text() == "keep me"


def test_import_refuses_a_training_run_whose_checkpoints_would_hide_the_import(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    r = sheepop("import", str(tmp_path / "hf"), f"out={run}", "--force")
    assert "is a training run (it has checkpoints/)" in one_error_line(r)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


def test_import_names_its_own_argument_when_the_folder_is_not_a_model(tmp_path):
    line = one_error_line(sheepop("import", str(tmp_path / "nothere"), f"out={tmp_path / 'run'}"))
    assert line.endswith(f"DIR={tmp_path / 'nothere'}: no config.json there; give a Hugging Face Llama folder "
                         "(config.json, model.safetensors or its shards, tokenizer.json)")
