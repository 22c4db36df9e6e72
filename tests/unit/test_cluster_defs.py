"""cluster/ and launch/: the Ray launcher YAMLs validate against the schema Ray ships, the KubeRay
manifests carry what KubeRay needs, and the Slurm/launch scripts issue the right commands.

The cloud and Kubernetes definitions run multi-node without a shared filesystem: their documented
commands put cluster.storage_path and data.out_dir in object storage (and compose as sheepop
configs), storage access comes from the machines' identity (instance profile, service account,
IRSA / Workload Identity), and no file under cluster/ or launch/ holds a credential. Slurm keeps
its shared filesystem.

Slurm, sbatch, the clouds and Kubernetes do not exist here: the scripts run with stub commands
on PATH that record their arguments (and, for `srun ... ray start --block`, sleep like the real
blocking process so the script's cleanup is exercised)."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT

CLOUD_YAMLS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
K8S = ROOT / "cluster" / "k8s"
SCHEME = {"aws": "s3://", "gcp": "gs://"}
COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                 "head_start_ray_commands", "worker_start_ray_commands")


def documented_commands(path: Path, program: str) -> list[list[str]]:
    """The `program ...` commands of a file's usage examples: `#` comment lines indented by at least
    two more spaces than prose (`#   cmd ...`), `\\` continuations joined."""
    cmds, cur = [], ""
    for line in path.read_text().splitlines():
        if not line.startswith("#   "):
            cur = ""
            continue
        text = line[1:].strip()
        cur = f"{cur} {text}" if cur else text
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        if program in cur:
            cmds.append(shlex.split(cur[cur.index(program):], comments=True))
        cur = ""
    return cmds


def submit_overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides of a `sheepop submit [--address URL] ...` command line."""
    assert argv[:2] == ["sheepop", "submit"], argv
    rest = argv[2:]
    if rest[:1] == ["--address"]:
        rest = rest[2:]
    assert not any(a.startswith("--") for a in rest), rest
    return rest


def assert_storage_overrides(overrides: list[str], scheme: str):
    """The overrides compose to a sheepop config whose checkpoints and data live in object storage."""
    from sheepop.config import compose

    cfg = compose(overrides)
    assert cfg.cluster.kind == "ray"
    assert cfg.cluster.storage_path.startswith(scheme), cfg.cluster.storage_path
    assert cfg.data.out_dir.startswith(scheme), cfg.data.out_dir
    assert cfg.run.name and cfg.run.name != "sheepop"  # a named run: resume finds <storage_path>/<run.name>/
    assert "://" not in str(cfg.run.dir)  # run.dir stays a local folder on the driver's machine
    return cfg


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


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_cloud_cluster_yaml_uses_object_storage_and_machine_identity(path):
    text = path.read_text()
    cfg = yaml.safe_load(text)
    scheme = SCHEME[path.stem]
    # The usage comment's `sheepop submit` puts checkpoints and data in the bucket, and composes.
    (submit,) = documented_commands(path, "sheepop submit")
    assert submit[2:4] == ["--address", "http://127.0.0.1:8265"]
    overrides = submit_overrides(submit)
    assert_storage_overrides(["cluster=ray", *overrides], scheme)
    assert any(c[:2] == ["sheepop", "watch"] and c[2].startswith(scheme) for c in documented_commands(path, "sheepop watch"))
    # Storage access comes from the machines' identity, on the head and on every GPU worker type.
    types = cfg["available_node_types"]
    for name, t in types.items():
        nc = t["node_config"]
        if path.stem == "aws":
            assert re.fullmatch(r"arn:aws:iam::\w+:instance-profile/[\w+=,.@-]+", nc["IamInstanceProfile"]["Arn"]), name
        else:
            (sa,) = nc["serviceAccounts"]
            assert sa["email"].endswith(".iam.gserviceaccount.com"), name
            assert set(sa["scopes"]) & {"https://www.googleapis.com/auth/devstorage.read_write",
                                        "https://www.googleapis.com/auth/cloud-platform"}, name
    if path.stem == "aws":
        assert "s3:ListBucket" in text and all(a in text for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"))
    else:
        assert "roles/storage.objectAdmin" in text
    # No shared filesystem is mounted: the EFS/Filestore mount survives only as a commented alternative.
    commands = " ; ".join(c for key in COMMAND_LISTS for c in cfg.get(key) or [])
    assert not re.search(r"\bmount\b|nfs|efs|/mnt/", commands, re.IGNORECASE), commands
    assert "a shared filesystem also works" in text.lower()
    assert "/mnt/efs" not in " ".join(submit) and "/mnt/shared" not in " ".join(submit)


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


def _kuberay_cluster_spec_ok(spec: dict, service_account: str) -> None:
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
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        # Storage access through the pod's ServiceAccount (IRSA / Workload Identity); no shared volume.
        assert pod["serviceAccountName"] == service_account
        assert not [v for v in pod.get("volumes", []) if "persistentVolumeClaim" in v or "nfs" in v]
        assert any(v["name"] == "dshm" and v["emptyDir"] == {"medium": "Memory"} for v in pod["volumes"])
    for c in [pod["containers"][0] for pod in pods]:
        for e in c.get("env", []):
            if "KEY" in e["name"] or "TOKEN" in e["name"]:
                assert "value" not in e and "secretKeyRef" in e["valueFrom"]  # secrets come from a Secret
        assert any(e["name"] == "WANDB_API_KEY" and e["valueFrom"]["secretKeyRef"]["name"] == "wandb" for e in c["env"])
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])  # NCCL's shared memory


def _service_account_ok(sa: dict) -> str:
    assert sa["apiVersion"] == "v1" and sa["kind"] == "ServiceAccount"
    ann = sa["metadata"]["annotations"]
    assert re.fullmatch(r"arn:aws:iam::\w+:role/[\w+=,.@-]+", ann["eks.amazonaws.com/role-arn"])  # EKS IRSA
    assert ann["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")  # GKE Workload Identity
    return sa["metadata"]["name"]


def _no_shared_volume(docs: list[dict]) -> None:
    def strings(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        else:
            yield str(obj)

    assert not {"PersistentVolumeClaim", "PersistentVolume"} & {d["kind"] for d in docs}
    assert not any(s in ("ReadWriteMany", "persistentVolumeClaim", "nfs") for d in docs for s in strings(d))


def test_kuberay_raycluster_manifest():
    path = K8S / "raycluster.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "RayCluster"]  # the account exists before the pods
    sa, rc = docs
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    assert rc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    _kuberay_cluster_spec_ok(rc["spec"], _service_account_ok(sa))
    _no_shared_volume(docs)
    (submit,) = documented_commands(path, "sheepop submit")
    assert_storage_overrides(["cluster=ray", *submit_overrides(submit)], "s3://")


def test_kuberay_rayjob_runs_sheepop_train_with_object_storage():
    docs = list(yaml.safe_load_all((K8S / "rayjob.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["ServiceAccount", "RayJob"]
    sa, job = docs
    # The same account as raycluster.yaml: applying both files leaves one consistent ServiceAccount.
    assert sa == yaml.safe_load_all((K8S / "raycluster.yaml").read_text()).__next__()
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    _kuberay_cluster_spec_ok(spec["rayClusterSpec"], _service_account_ok(sa))
    _no_shared_volume(docs)
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["sheepop", "train", "cluster=ray"]
    # The overrides in the manifest are a valid sheepop config with checkpoints and data in storage.
    cfg = assert_storage_overrides(argv[2:], "s3://")
    assert Path(cfg.run.dir).is_absolute()  # a folder in the head pod, not the job's temporary working dir
    renv = yaml.safe_load(spec["runtimeEnvYAML"])
    assert renv["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"


# --------------------------------------------------------------------------------------------
# no credentials anywhere; Slurm keeps its shared filesystem

CREDENTIAL_PATTERNS = [
    re.compile(r"(?:AKIA|ASIA)[0-9A-Z]{16}"),  # AWS access key ids (long-term, temporary)
    re.compile(r"aws_secret_access_key", re.IGNORECASE),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),  # PEM keys, GCP service-account key files
    re.compile(r'"private_key(?:_id)?"\s*:'),
]


def _credentials_in(text: str) -> list[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


def _definition_files() -> list[Path]:
    files = [p for p in (ROOT / "cluster").rglob("*") if p.is_file()]
    files += sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "docs" / "cluster.md"]
    assert {p.name for p in files} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml", "Dockerfile",
                                       "sheepop.sbatch", "submit.sh", "cluster.md"}
    return files


def test_no_credentials_in_cluster_definitions():
    found = {str(p.relative_to(ROOT)): hits for p in _definition_files() if (hits := _credentials_in(p.read_text()))}
    assert not found


def test_credential_scan_finds_keys():
    """The scan above can fail: a pasted key pair, a profile line and a key file are all caught."""
    key_id = "AKIA" + "Q" * 16
    assert _credentials_in(f"AWS_ACCESS_KEY_ID={key_id}") == [key_id]
    assert _credentials_in("aws_secret_access_key = abc") and _credentials_in("AWS_SECRET_ACCESS_KEY: abc")
    assert _credentials_in('{"type": "service_account", "private_key": "x"}')
    assert not _credentials_in("IamInstanceProfile: {Arn: arn:aws:iam::ACCOUNT:instance-profile/sheepop-s3}")


def test_slurm_keeps_its_shared_filesystem():
    sbatch = ROOT / "cluster" / "slurm" / "sheepop.sbatch"
    text = sbatch.read_text()
    assert "shared filesystem" in text
    (cmd,) = documented_commands(sbatch, "sbatch")
    overrides = dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("--"))
    assert overrides["run.dir"].startswith("/shared/") and overrides["data.out_dir"].startswith("/shared/")
    assert "cluster.storage_path=s3://" in text  # object storage is an option there too
    assert "shared filesystem" in (ROOT / "launch" / "slurm.sh").read_text()


def test_cluster_doc_describes_storage_without_shared_filesystem():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert "## Multi-node without a shared filesystem" in doc and "## With a shared filesystem" in doc
    for phrase in ("done/rank_", "trainer.resume=auto", "SHEEPOP_CACHE_DIR", "AWS_ENDPOINT_URL", "universal",
                   "cluster.storage_path=s3://", "data.out_dir=s3://", "sheepop watch s3://"):
        assert phrase in doc, phrase
    # The statements that multi-node needs shared storage are gone.
    assert "on storage every node sees" not in doc and "are refused" not in doc and "is refused" not in doc


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
    # STUB_FOLLOW_UNTIL_STOP: follow the job until `sheepop stop` is called (up to 300 s, a hang guard)
    [[ -n "${STUB_FOLLOW_UNTIL_STOP:-}" ]] && for _ in $(seq 3000); do grep -q "^sheepop stop " LOG && break; sleep 0.1; done
    exit "${STUB_SUBMIT_RC:-0}" ;;
  *" sheepop jobs "*) printf "ID STATUS STARTED\nraysubmit_old SUCCEEDED x\nraysubmit_42 RUNNING x\n" ;;
  *" sheepop stop "*) exec sheepop "${@: -4}" ;;
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


def test_slurm_warning_signal_stops_the_running_job_gracefully(stubs, tmp_path):
    """--signal=B:TERM@300: SIGTERM to the batch script becomes `sheepop stop` of the running job
    (whose ranks save); the script then follows the job to its end and exits with its state."""
    env, log = stubs
    env.update({"SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_SUBMIT_DIR": str(ROOT), "STUB_NODES": "2",
                "STUB_FOLLOW_UNTIL_STOP": "1", "STUB_SUBMIT_RC": "3"})
    p = subprocess.Popen(["bash", str(ROOT / "cluster" / "slurm" / "sheepop.sbatch"), "model=small"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a hang guard
    while not (log.exists() and any(c[:1] == ["srun"] and "submit" in c for c in _calls(log))) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, out + err  # the followed job ended STOPPED
    assert "stopping the job gracefully" in out
    stops = [c for c in _calls(log) if c[:2] == ["sheepop", "stop"]]
    assert stops == [["sheepop", "stop", "raysubmit_42", "--address", "http://127.0.0.1:8265"]]
    import psutil

    for q in psutil.process_iter(["cmdline"]):
        if (q.info["cmdline"] or []) == ["sleep", env["STUB_SLEEP"]]:
            q.kill()


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
