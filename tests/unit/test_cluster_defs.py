"""cluster/ and launch/: the Ray launcher YAMLs validate against the schema Ray ships, the KubeRay
manifests carry what KubeRay needs, and the Slurm/launch scripts issue the right commands.

Slurm, sbatch, the clouds and Kubernetes do not exist here: the scripts run with stub commands
on PATH that record their arguments (and, for `srun ... ray start --block`, sleep like the real
blocking process so the script's cleanup is exercised)."""
from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT

CLOUD_YAMLS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_cloud_cluster_yaml_validates_against_ray_schema(path):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, ray_schema())
    validate_config(cfg)  # the schema plus Ray's own cross-field checks
    filled = prepare_config(copy.deepcopy(cfg))  # what `ray up` does: merge provider defaults, validate
    assert filled["provider"]["type"] == path.stem

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0  # CPU head, no training
    gpu_types = [t for n, t in types.items() if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    setup = " ; ".join(cfg["setup_commands"])
    assert "pip install" in setup and "~/sheepop" in setup and "import sheepop.cli" in setup
    assert cfg["file_mounts"] == {"~/sheepop": "."}
    assert any(".env" in p for p in cfg["rsync_exclude"]) and any(".git" in p for p in cfg["rsync_exclude"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH), not the internet
    assert "WANDB_API_KEY=" not in path.read_text()


def test_ray_schema_rejects_a_broken_cluster_yaml():
    """The validation above can fail: a misspelt node-type key and a missing provider type."""
    cfg = yaml.safe_load(CLOUD_YAMLS[0].read_text())
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = bad["available_node_types"]["gpu_worker"].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = copy.deepcopy(cfg)
    del bad["provider"]["type"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())


def _kuberay_cluster_spec_ok(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    # KubeRay's CRD types rayStartParams as map[string]string: a bare YAML number is rejected.
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    head_c = head["template"]["spec"]["containers"][0]
    assert head_c["image"] and head_c["name"]
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265}
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["image"] == head_c["image"]
    for c in [head_c] + [g["template"]["spec"]["containers"][0] for g in groups]:
        for e in c.get("env", []):
            if "KEY" in e["name"] or "TOKEN" in e["name"]:
                assert "value" not in e and "secretKeyRef" in e["valueFrom"]  # secrets come from a Secret
        assert any(m["mountPath"] == "/mnt/runs" for m in c["volumeMounts"])


def test_kuberay_raycluster_manifest():
    docs = list(yaml.safe_load_all((ROOT / "cluster" / "k8s" / "raycluster.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    pvc, rc = kinds["PersistentVolumeClaim"], kinds["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    _kuberay_cluster_spec_ok(rc["spec"])
    claims = {v["persistentVolumeClaim"]["claimName"] for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_kuberay_rayjob_runs_sheepop_train_with_valid_overrides():
    from sheepop.config import compose

    (job,) = yaml.safe_load_all((ROOT / "cluster" / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    _kuberay_cluster_spec_ok(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["sheepop", "train", "cluster=ray"]
    cfg = compose(argv[2:])  # the overrides in the manifest are a valid sheepop config
    assert cfg.cluster.kind == "ray" and cfg.run.dir.startswith("/mnt/runs/")
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert renv["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


# --------------------------------------------------------------------------------------------
# shell scripts with stub commands


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)


@pytest.fixture
def stubs(tmp_path):
    """bin/ with srun, scontrol, ray, sbatch and sheepop stubs; each logs `name args` to calls.log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    # One write per call: background stubs run concurrently, and a single short O_APPEND write
    # keeps their lines whole.
    record = f'line="$(basename "$0")$(printf " %q" "$@")"; printf "%s\\n" "$line" >> {log}\n'
    _stub(bin_dir, "scontrol", record + '[[ "$1 $2" == "show hostnames" ]] && printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n')
    _stub(bin_dir, "srun", record + """
case " $* " in
  *" hostname --ip-address"*) echo "10.0.0.7 172.17.0.1" ;;
  *" ray start "*) exec sleep "$STUB_SLEEP" ;;  # blocks like `ray start --block`
  *" sheepop submit "*)  # like Ray Train, wait for the nodes (stubs that would otherwise be killed unseen);
    # up to 300 s, a hang guard: on a loaded machine the worker steps may take seconds to start
    for _ in $(seq 3000); do (( $(grep -c " ray start " LOG) >= ${STUB_NODES:-1} )) && break; sleep 0.1; done
    exit "${STUB_SUBMIT_RC:-0}" ;;
esac
""")
    (bin_dir / "srun").write_text((bin_dir / "srun").read_text().replace("LOG", str(log)))
    _stub(bin_dir, "ray", record)
    _stub(bin_dir, "sbatch", record + 'echo "Submitted batch job 42"\n')
    _stub(bin_dir, "sheepop", record)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "STUB_SLEEP": f"30.{os.getpid()}"}  # a duration no other process uses: found again below
    return env, log


def _calls(log: Path) -> list[list[str]]:
    return [shlex.split(line) for line in log.read_text().splitlines()]


def test_slurm_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "cluster" / "slurm" / "sheepop.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_script_starts_head_then_workers_then_submits(stubs, tmp_path):
    import psutil

    env, log = stubs
    env.update({"SLURM_JOB_NODELIST": "gpu-[a-c]", "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4",
                "SLURM_SUBMIT_DIR": str(ROOT), "STUB_SUBMIT_RC": "3", "STUB_NODES": "3"})
    r = subprocess.run(["bash", str(ROOT / "cluster" / "slurm" / "sheepop.sbatch"), "model=small", "run.dir=/shared/r1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stdout + r.stderr  # the script exits with the job's exit code
    calls = _calls(log)
    assert calls[0] == ["scontrol", "show", "hostnames", "gpu-[a-c]"]
    sruns = [c for c in calls if c[0] == "srun"]
    assert sruns[0][-2:] == ["hostname", "--ip-address"] and "gpu-a" in sruns[0]
    head = next(c for c in sruns if "--head" in c)
    assert head[head.index("-w") + 1] == "gpu-a"
    assert {"--node-ip-address=10.0.0.7", "--port=6379", "--block", "--dashboard-host=127.0.0.1",
            "--num-cpus=16", "--num-gpus=4"} <= set(head)
    workers = [c for c in sruns if "ray" in c and "start" in c and "--head" not in c]
    assert sorted(c[c.index("-w") + 1] for c in workers) == ["gpu-b", "gpu-c"]
    assert all("--address=10.0.0.7:6379" in c and "--block" in c for c in workers)
    assert any(c[:2] == ["ray", "health-check"] and "10.0.0.7:6379" in c for c in calls)  # waited for the head
    submit = next(c for c in sruns if "submit" in c)
    assert submit[submit.index("-w") + 1] == "gpu-a" and "--overlap" in submit
    i = submit.index("sheepop")
    assert submit[i:i + 4] == ["sheepop", "submit", "--address", "http://127.0.0.1:8265"]
    assert "--follow" in submit and "cluster.num_workers=12" in submit and "cluster.use_gpu=true" in submit
    assert submit[-2:] == ["model=small", "run.dir=/shared/r1"]  # user overrides last: they win
    # Cleanup stopped the blocking `ray start` steps it launched (without it they outlive the script).
    left = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or []) == ["sleep", env["STUB_SLEEP"]]]
    for p in left:
        p.kill()
    assert not left


def test_launch_scripts_parse_and_pass_arguments(stubs, tmp_path):
    env, log = stubs
    for script in sorted((ROOT / "launch").glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"

    r = subprocess.run([str(ROOT / "launch" / "local.sh"), "model=tiny"], env={**env, "WORKERS": "2"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(ROOT / "launch" / "submit.sh"), "model=tiny"], env={**env, "ENV": "WANDB_API_KEY HF_TOKEN"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(ROOT / "launch" / "submit.sh"), "-m", "trainer.lr=1e-3,3e-3"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(ROOT / "launch" / "slurm.sh"), "model=small"], env={**env, "NODES": "4", "PARTITION": "a100"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    calls = _calls(log)
    assert calls[0] == ["sheepop", "train", "cluster=local", "cluster.num_workers=2", "model=tiny"]
    assert calls[1] == ["sheepop", "submit", "--follow", "--env", "WANDB_API_KEY", "--env", "HF_TOKEN", "model=tiny"]
    assert calls[2] == ["sheepop", "submit", "-m", "trainer.lr=1e-3,3e-3"]  # a sweep is not followed
    assert calls[3][:4] == ["sbatch", "--nodes=4", "--gpus-per-node=4", "--partition=a100"]
    assert calls[3][-2:] == ["cluster/slurm/sheepop.sbatch", "model=small"]
