"""Step time around a checkpoint with asynchronous vs synchronous upload to slow object storage.

Starts a real S3 server (moto) on 127.0.0.1 behind a bandwidth-limited TCP proxy (also on
127.0.0.1), both on this machine's last CPU (they stand for a remote store), then trains the same
run with `cluster.storage_path=s3://...` (`cluster=local`: Ray Train, 1 worker; or `cluster=process`)
on the other CPUs three times: with `cluster.checkpoint_upload=async` (the default), with `sync`,
and async with the checkpoint staged on disk instead of in RAM (`cluster.checkpoint_staging`); and
once more with no upload at all (checkpoints in run.dir on the local disk), the baseline for what
the step after a save costs whatever the upload does.
For each it prints the median compute time of a normal step and of the step right after a save
(from metrics.jsonl's step_time), their ratio (with async the upload runs beside training: ~1.0),
and how long the save blocked training (gap between the two step lines minus the step's compute):
with async the local write and hand-off only, with sync also the whole upload.

    python bench/checkpoint_upload.py [model=tiny] [steps=60] [save_every=10] [kbps=2000] [cluster=local]
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sheepop.cli.args import bench_options  # noqa: E402
from sheepop.net import free_port  # noqa: E402


def throttling_proxy(listen: int, target: int, bytes_per_s: float) -> None:
    """Forward 127.0.0.1:listen → 127.0.0.1:target, each direction limited to bytes_per_s."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(len(data) / bytes_per_s)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def step_times(run: Path, save_every: int) -> tuple[float, float, float]:
    """Medians, in seconds: a normal step's compute (step_time), the same for the step right after
    a save (does the upload slow training down?), and what the save itself blocked (the gap between
    two step lines minus the step's compute: local write + hand-off, plus the upload when sync)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "event" not in r]
    t = {r["step"]: r["time"] for r in rows}
    compute = {r["step"]: r["step_time"] for r in rows}
    after = [s for s in compute if (s - 1) % save_every == 0 and s - 1 > 0 and s - 1 in t]
    normal = [s for s in compute if (s - 1) % save_every != 0 and s % save_every != 0 and s > 2]
    blocked = [t[s] - t[s - 1] - compute[s] for s in after]
    return (statistics.median(compute[s] for s in normal), statistics.median(compute[s] for s in after),
            statistics.median(blocked))


def main() -> int:
    o = bench_options(sys.argv[1:], {"model": str, "steps": int, "save_every": int, "kbps": float, "cluster": str}, "bench/checkpoint_upload.py")
    model, steps, save_every = o.get("model", "tiny"), o.get("steps", 60), o.get("save_every", 10)
    bytes_per_s = o.get("kbps", 2000.0) * 1000
    work = Path(tempfile.mkdtemp(prefix="sheepop-bench-upload-"))
    moto_port, proxy_port = free_port(), free_port()
    # The S3 server and the proxy stand for remote storage: they get this machine's last CPU and
    # training the others. On one shared set of cores moto alone burns ~2.9 CPU-s per 100 MB it
    # receives (the client ~0.2-0.5 s), which would slow training during any upload for a reason
    # a real object store does not have.
    cpus = sorted(os.sched_getaffinity(0))
    storage_cpus, train_cpus = (cpus[-1:], cpus[:-1]) if len(cpus) > 1 else (cpus, cpus)
    pin = lambda which: (lambda: os.sched_setaffinity(0, which))  # noqa: E731
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                             str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=pin(storage_cpus))
    proxy = subprocess.Popen([sys.executable, __file__, "--proxy", str(proxy_port), str(moto_port), str(bytes_per_s)],
                             preexec_fn=pin(storage_cpus))
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "SHEEPOP_CACHE_DIR": str(work / "cache"), "WANDB_MODE": "disabled"}
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{moto_port}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{moto_port}/bench", method="PUT")
        urllib.request.urlopen(req, timeout=10)  # create the bucket (fast path, not throttled)
        results = {}
        disk = tempfile.gettempdir()
        # (row, upload mode, where the checkpoint is staged before its upload: RAM by default)
        # The last row uploads nothing (checkpoints written into run.dir on local disk): what the
        # step after a save costs by itself (the caches the save evicted), whatever the upload does.
        rows = [("async", "async", "auto"), ("sync", "sync", "auto"), (f"async, staged in {disk}", "async", disk),
                ("no upload (local run.dir)", None, "auto")]
        for label, mode, staging in rows:
            run = work / label.replace(" ", "_").replace(",", "").replace("/", "_").replace("(", "").replace(")", "")
            where = ["cluster.storage_path=s3://bench/runs", f"cluster.checkpoint_upload={mode}"] if mode else []
            cmd = [sys.executable, "-m", "sheepop.cli", "train", f"model={model}", "trainer=quick", "logger=none",
                   f"cluster={o.get('cluster', 'local')}", f"run.dir={run}", f"run.name={run.name}", *where,
                   f"cluster.checkpoint_staging={staging}",
                   f"trainer.max_steps={steps}",
                   f"trainer.save_every={save_every}", "trainer.eval_every=0", "trainer.progress=false",
                   "trainer.keep_checkpoints=0", "data.max_bytes=3000000", f"data.out_dir={work / 'data'}"]
            t0 = time.time()
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=pin(train_cpus))
            if r.returncode != 0:
                print(r.stdout[-2000:], r.stderr[-3000:])
                return 1
            results[label] = (*step_times(run, save_every), time.time() - t0)
        print(f"model={model}, {steps} steps, a checkpoint every {save_every}, storage at {bytes_per_s / 1e3:,.0f} kB/s; "
              f"training on CPUs {train_cpus}, the storage on {storage_cpus}")
        print(f"{'upload':<26}{'normal step':>13}{'step after a save':>19}{'ratio':>7}{'save blocked':>14}{'run wall':>10}")
        for mode, (normal, after, blocked, wall) in results.items():
            print(f"{mode:<26}{normal * 1e3:>10.0f} ms{after * 1e3:>16.0f} ms{after / normal:>7.2f}"
                  f"{blocked * 1e3:>11.0f} ms{wall:>9.0f}s")
        return 0
    finally:
        moto.terminate()
        proxy.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--proxy"]:
        throttling_proxy(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
