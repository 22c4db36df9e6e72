"""sheepop.storage against a local folder, a real S3 server (moto) and a real GCS API server
(fake-gcs-server) on loopback, and the checks that fail before anything starts: one line each,
naming the problem."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from sheepop import storage
from sheepop.errors import UserError
from tests.helpers.s3 import S3Server


@pytest.fixture()
def s3_env(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


@pytest.fixture()
def gcs_env(gcs, monkeypatch):
    for k, v in gcs.env().items():
        monkeypatch.setenv(k, v)
    return gcs


def base_of(kind: str, tmp_path, request, name: str) -> str:
    """A fresh folder of each kind: local, s3://bucket/prefix (moto), gs://bucket/prefix (fake-gcs-server)."""
    if kind == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue(f"{kind}_env")
    return f"{kind}://{server.bucket(f'{name}-{os.getpid()}')}/prefix"


@pytest.mark.parametrize("kind", ["local", "s3", "gs"])
def test_files_round_trip(kind, tmp_path, request):
    base = base_of("gcs" if kind == "gs" else kind, tmp_path, request, "rt").replace("gcs://", "gs://")
    storage.write_text(storage.join(base, "a", "b.txt"), "hello")
    assert storage.exists(base) and storage.is_file(storage.join(base, "a", "b.txt"))
    assert storage.read_text(storage.join(base, "a", "b.txt")) == "hello"
    local = tmp_path / "up"
    (local / "ds").mkdir(parents=True)
    (local / "ds" / "x.pt").write_bytes(b"0" * 1000)
    (local / "meta.json").write_text("{}")
    storage.upload(local, storage.join(base, "ck"))
    assert storage.sizes(storage.join(base, "ck")) == {"ds/x.pt": 1000, "meta.json": 2}
    assert storage.listdir(base) == ["a", "ck"]
    got = storage.download(storage.join(base, "ck"), tmp_path / "down", files=["ds/x.pt"])
    assert (got / "ds" / "x.pt").read_bytes() == b"0" * 1000 and not (got / "meta.json").exists()
    storage.remove(storage.join(base, "ck"))
    assert storage.listdir(base) == ["a"]


def test_a_local_upload_never_shows_a_partial_file(tmp_path, monkeypatch):
    """Another rank may read a manifest while it is being uploaded (prune does, after its own
    upload): a local upload, like an object store, makes each file appear whole or not at all."""
    import shutil

    src = tmp_path / "src"
    (src / "done").mkdir(parents=True)
    (src / "done" / "rank_1.json").write_text('{"files": {}}')
    dst = tmp_path / "dst"
    seen = []
    real_copy = shutil.copyfile

    def copy_and_look(a, b):
        real_copy(a, b)
        seen.append(sorted(p.name for p in (dst / "done").iterdir()))  # what a reader sees mid-upload

    monkeypatch.setattr(storage.shutil, "copyfile", copy_and_look)
    storage.upload(src, dst)
    assert seen and all("rank_1.json" not in names for names in seen)
    assert storage.read_text(dst / "done" / "rank_1.json") == '{"files": {}}'
    assert storage.listdir(dst / "done") == ["rank_1.json"]  # no temporary file left behind


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_an_upload_beside_training_yields_the_cpu_only_for_object_storage(kind, tmp_path, s3_env):
    """checkpoint_files.upload(beside_training=True), as an async checkpoint upload runs it in a thread
    of its own: to object storage that thread drops to nice 19 and writes every multipart part itself
    (a 12 MB file: pyarrow's S3 client would hand parts to its own I/O threads); a local copy keeps
    its priority. The files and the manifest arrive either way; the caller's priority is untouched."""
    import threading

    from sheepop.train import checkpoint_files

    base = str(tmp_path / "store") if kind == "local" else f"s3://{s3_env.bucket(f'bt-{os.getpid()}')}/run"
    local = tmp_path / "step"
    (local / "ds").mkdir(parents=True)
    (local / "ds" / "shard.pt").write_bytes(os.urandom(12 * 2**20))
    checkpoint_files.write_marker(local, 0)
    seen = {}

    def upload():
        checkpoint_files.upload(local, storage.join(base, "step_000001"), beside_training=True)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=upload)
    t.start()
    t.join()
    assert seen["nice"] == (19 if kind == "s3" else before)
    if kind == "s3":  # the filesystem that wrote the parts: the same endpoint, no background writes
        fs, _ = storage.filesystem(base)
        options = storage._foreground_writes(fs).__reduce__()[1][0]
        assert options["background_writes"] is False and options["endpoint_override"] == fs.__reduce__()[1][0]["endpoint_override"]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    got = storage.sizes(storage.join(base, "step_000001"))
    assert got["ds/shard.pt"] == 12 * 2**20 and "done/rank_0.json" in got
    assert checkpoint_files.localize(storage.join(base, "step_000001")).is_dir()  # sha256s match the manifest


def test_gcs_listing_still_needs_the_workaround(gcs_env):
    """compat.gcs_listdir/gcs_delete_dir: pyarrow's GcsFileSystem (26.0) sees a folder only through
    a marker object. If this fails after an upgrade, pyarrow lists and deletes implicit folders
    itself and the workaround can go."""
    import pyarrow.fs as pafs

    base = f"gs://{gcs_env.bucket(f'raw-{os.getpid()}')}/run"
    storage.write_text(storage.join(base, "checkpoints", "step_000002", "meta.json"), "{}")
    fs, path = storage.filesystem(base)
    assert fs.get_file_info(pafs.FileSelector(path)) == []  # pyarrow: no "checkpoints" in the listing
    with pytest.raises(FileNotFoundError):
        fs.delete_dir(f"{path}/checkpoints")  # deletes the file, then fails on the missing marker
    assert storage.listdir(base) == []  # the file is gone: the folder with it


def test_gcs_remove_takes_a_folders_marker_too(gcs_env):
    """A folder that another tool created with a marker object (pyarrow's create_dir, the console):
    storage.remove deletes its contents and the marker, and nothing is left in the bucket."""
    bucket = gcs_env.bucket(f"marker-{os.getpid()}")
    base = f"gs://{bucket}/run"
    fs, path = storage.filesystem(base)
    fs.create_dir(f"{path}/checkpoints/step_000003")
    storage.write_text(storage.join(base, "checkpoints", "step_000003", "meta.json"), "{}")
    assert any(k.endswith("step_000003/") for k in gcs_env.objects(bucket))  # the marker is there
    assert storage.listdir(storage.join(base, "checkpoints")) == ["step_000003"]
    storage.remove(storage.join(base, "checkpoints", "step_000003"))
    assert storage.listdir(storage.join(base, "checkpoints")) == []
    assert not [k for k in gcs_env.objects(bucket) if "step_000003" in k]


def test_gcs_checks_are_one_line(gcs_env, monkeypatch):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("gs://no-such-bucket/x", "cluster.storage_path")
    bucket = gcs_env.bucket(f"fine-{os.getpid()}")
    storage.check_writable(f"gs://{bucket}/runs", "cluster.storage_path")
    assert gcs_env.objects(bucket) == {}  # the probe object is gone again
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(UserError, match=r"cannot reach the GCS endpoint http://127\.0\.0\.1:9 .*STORAGE_EMULATOR_HOST"):
        storage.check_writable("gs://nope/x", "cluster.storage_path")


def test_unreachable_endpoint_is_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(UserError, match=r"cannot reach the S3 endpoint http://127\.0\.0\.1:9"):
        storage.check_writable("s3://nope/x", "cluster.storage_path")


def test_missing_credentials_missing_bucket(s3_env, monkeypatch):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/x", "cluster.storage_path")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(UserError, match="no AWS credentials"):
        storage.check_writable(f"s3://{s3_env.bucket('creds-check')}/x", "cluster.storage_path")


def test_no_write_permission(tmp_path, monkeypatch):
    """moto with authentication on: an IAM user allowed to read but not to write."""
    server = S3Server(tmp_path, enforce_auth_after=4)  # bucket, user, policy, key: then auth is checked
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        bucket = server.bucket("read-only-bucket")
        for k, v in server.read_only_user().items():
            monkeypatch.setenv(k, v)
        storage._fs_cache.clear()
        with pytest.raises(UserError, match="no write permission"):
            storage.check_writable(f"s3://{bucket}/runs", "cluster.storage_path")
    finally:
        server.stop()


def test_commands_that_read_a_run_in_storage_fail_in_one_line(s3_env, tmp_path):
    """watch, report, export (generate and eval load the same way) and trainer.resume: a bucket or
    path that is not there, an endpoint that does not answer: one line each, not a traceback."""
    from tests.helpers import one_error_line, sheepop

    bucket = s3_env.bucket("read-check")
    nope = f"s3://{bucket}/runs/nope"
    for args, needle in [
        (["watch", "s3://no-such-bucket/runs/x"], "RUN_DIR=s3://no-such-bucket/runs/x: bucket 'no-such-bucket' does not exist"),
        (["report", nope], f"RUN_DIR={nope}: nothing there in the bucket"),
        (["export", f"run.dir={nope}", "format=pt", f"out={tmp_path}/m.pt"], f"run.dir={nope}: nothing there"),
        (["train", "model=tiny", f"run.dir={tmp_path}/run", f"trainer.resume={nope}"], f"trainer.resume={nope}: nothing there"),
    ]:
        assert needle in one_error_line(sheepop(*args))
    r = sheepop("watch", nope, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})  # discard port: nothing listens
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in one_error_line(r)
    assert not (tmp_path / "m.pt").exists()


def test_refusals_name_the_reason_in_a_few_words():
    msg = "AWS Error ACCESS_DENIED during HeadObject operation: InvalidAccessKeyId: the key id does not exist"
    assert storage.refusal(msg, "read").startswith("the credentials were refused")
    assert storage.refusal("AWS Error ACCESS_DENIED during PutObject: Access Denied", "write") == \
        "no write permission (Access Denied)"


def test_writable_locations_pass(s3_env, tmp_path):
    storage.check_writable(str(tmp_path / "new" / "dir"), "run.dir")
    storage.check_writable(f"s3://{s3_env.bucket('fine-bucket')}/runs", "cluster.storage_path")
    assert storage.listdir("s3://fine-bucket/runs") == []  # the probe object is gone again


def test_a_checkpoint_saved_again_at_the_same_uri_is_read_fresh(s3_env, tmp_path, monkeypatch):
    """A step saved again where it was before (a new run of the same run.name, a restarted group's
    re-save) has files of the same sizes and other bytes: a rank's local cache of the old one must
    not stand in for it. (Before: kept by size, then refused as "does not match its manifest".)"""
    from sheepop.train import checkpoint_files

    monkeypatch.setenv("SHEEPOP_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = f"s3://{s3_env.bucket(f'again-{os.getpid()}')}/run/checkpoints/step_000001"
    for version in (b"a", b"b"):
        local = tmp_path / f"save-{version.decode()}"
        (local / "ds").mkdir(parents=True)
        (local / "ds" / "shard.pt").write_bytes(version * 1000)
        (local / "meta.json").write_text(json.dumps({"step": 1, "v": version.decode()}))
        checkpoint_files.write_marker(local, 0)
        checkpoint_files.upload(local, ckpt)
        got = checkpoint_files.localize(ckpt, rank=0)
        assert (got / "ds" / "shard.pt").read_bytes() == version * 1000
        assert json.loads((got / "meta.json").read_text())["v"] == version.decode()


def test_data_prepared_again_at_the_same_uri_is_not_read_from_a_stale_cache(s3_env, tmp_path, monkeypatch):
    """A node's cache of data.out_dir in storage holds shards of an earlier preparation, with the
    same names and sizes: filling it for the new manifest downloads them again."""
    import numpy as np

    from sheepop.data.shards import local_dir, verify_prepared

    monkeypatch.setenv("SHEEPOP_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_env.bucket(f'data-{os.getpid()}')}/stdlib"
    for fingerprint, token in (("first", 1), ("second", 2)):
        shard = np.full(64, token, dtype=np.uint16).tobytes()
        manifest = {"fingerprint": fingerprint, "dtype": "uint16",
                    "splits": {"train": {"shards": [{"file": "train_000.bin", "tokens": 64,
                                                     "sha256": hashlib.sha256(shard).hexdigest()}]}}}
        storage.write_bytes(storage.join(uri, "train_000.bin"), shard)
        storage.write_text(storage.join(uri, "tokenizer.json"), "{}")
        storage.write_text(storage.join(uri, "manifest.json"), json.dumps(manifest))
        out = verify_prepared(uri, manifest, where="this node")
        assert out == local_dir(uri)
        assert np.fromfile(out / "train_000.bin", dtype=np.uint16).tolist() == [token] * 64


def test_a_data_out_dir_in_storage_that_is_a_bucket_root_or_holds_other_objects_is_refused(s3_env, tmp_path):
    from tests.helpers import one_error_line, sheepop

    bucket = s3_env.bucket("precious")
    storage.write_text(f"s3://{bucket}/notes/important.txt", "keep me")
    for out, needle in [(f"s3://{bucket}", "a bucket's root; give a prefix inside it"),
                        (f"s3://{bucket}/notes", "holds other objects (important.txt) but no manifest.json")]:
        r = sheepop("prepare", "model=tiny", f"data.out_dir={out}")
        assert f"data.out_dir={out}" in one_error_line(r) and needle in r.stderr
    assert storage.listdir(f"s3://{bucket}/notes") == ["important.txt"]


def test_storage_lost_mid_run_ends_it_in_one_line_and_the_last_complete_checkpoint_stays(tmp_path):
    """A run whose object store goes away after its first checkpoint: the next upload fails, and
    the run ends in one line naming the checkpoint and the way back (not a pyarrow traceback)."""
    import subprocess
    import sys

    from sheepop.monitor.metrics_file import read_metrics
    from tests.helpers import ROOT, tiny_overrides, wait_for

    server = S3Server(tmp_path)  # this test's own: it is stopped mid-run
    try:
        bucket = server.bucket("goes-away")
        run = tmp_path / "run"
        p = subprocess.Popen([sys.executable, "-m", "sheepop.cli", "train",
                              *tiny_overrides(run, "trainer.max_steps=100000", "trainer.save_every=3",
                                              "trainer.eval_every=0", f"cluster.storage_path=s3://{bucket}/runs",
                                              "run.name=r", "cluster.checkpoint_upload=sync")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **server.env()})
        try:
            wait_for(lambda: any(e.get("event") == "checkpoint" for e in read_metrics(run)) or p.poll() is not None,
                     300, "the first checkpoint")
            server.stop()
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
    finally:
        server.stop()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"checkpoint s3://{bucket}/runs/r/checkpoints/step_" in lines[0] and "upload failed (" in lines[0]
    assert "trainer.resume=auto continues from it" in lines[0]
