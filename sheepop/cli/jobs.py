"""Ray Jobs: `sheepop submit | jobs | status | logs | stop` against a running Ray cluster.

`submit` composes and validates the config here first (a bad override never reaches the
cluster), checks what would be uploaded (its size, and credentials: files named like one are left
out, EXCLUDES; a file holding one refuses the submission, find_secrets), then hands Ray's Job
Submission SDK the entrypoint `python -m sheepop.cli train cluster=ray <the same overrides>`
with the project folder as runtime_env working_dir. Ray unpacks that folder on the head node,
runs the entrypoint there (cwd = the folder, which Ray also puts first on PYTHONPATH, so the
uploaded code is what runs) and the driver connects to the cluster through the RAY_ADDRESS that
Ray sets for it.

Secrets travel as environment variables named on the command line (`--env WANDB_API_KEY`):
the value is read from the submitter's environment into runtime_env env_vars, never into a
file. Ray keeps a job's runtime_env in its job table, so anyone who can reach the dashboard
(port 8265) can read those values: see docs/cluster.md.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse

from sheepop.errors import UserError
from sheepop.net import require_listening
from sheepop.units import duration

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Never uploaded, whatever .gitignore says: VCS and venvs (size), run outputs and prepared data
# (size; they belong on shared storage), and anything that may hold credentials.
EXCLUDES = [
    ".git", ".hg", ".venv", "venv", "env/", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    ".mypy_cache", ".ruff_cache", "node_modules",
    "outputs/", "wandb/", "multirun/", "checkpoints/", "data/prepared/",
    "*.bin", "*.npy", "*.pt", "*.safetensors", "*.arrow", "*.parquet",
    ".env*", "*.env", ".netrc", "_netrc", ".pypirc", ".npmrc", ".git-credentials", ".dockercfg",
    "credentials*", "*credentials*.json", "*service-account*.json", "*service_account*.json", "*secret*", "*.pem", "*.key",
    "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*", "id_ed25519*", "*.token", "auth_token",
    ".aws/", ".ssh/", ".gnupg/", ".kube/", ".config/gcloud/", ".docker/", ".ray/",
]

# Forwarded when set in the submitter's environment; `--env NAME` adds more. The W&B key only when
# a job logs to W&B online: a forwarded value lands in Ray's job table and its runtime-env agent's
# log on the head node (docs/cluster.md), so it goes nowhere it is not needed.
DEFAULT_FORWARD = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT",
                   "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")  # where object storage is, not who may use it
SECRETS = ("WANDB_API_KEY",)  # of DEFAULT_FORWARD: forwarded only where a job needs it (forwarded_env)

# Job state → exit code of `status`, `logs --follow`, `submit --follow`.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODE = {"SUCCEEDED": 0, "PENDING": 0, "RUNNING": 0, "FAILED": 1, "STOPPED": 3}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one UserError line instead of usage + exit(2)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message}; see `sheepop {self.prog.split()[-1]} --help`")


def _parser(command: str, description: str) -> _Parser:
    p = _Parser(prog=f"sheepop {command}", description=description)
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard address (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    return p


# The commands about one job: description, on/off flags (names, help), a time limit (flag, default, help).
JOB_COMMANDS: dict[str, tuple[str, list[tuple[tuple[str, ...], str]], tuple[str, float, str] | None]] = {
    "status": ("Status of a Ray Job. Exit code: 0 succeeded/pending/running, 1 failed, 3 stopped.",
               [(("--wait",), "wait until the job ends; exit 0 only if it succeeded")],
               ("--timeout", 0, "with --wait: give up after this many seconds (0 = never)")),
    "logs": ("Logs of a Ray Job (the entrypoint's stdout and stderr).",
             [(("-f", "--follow"), "keep streaming until the job ends; exit with its state")], None),
    "stop": ("Stop a Ray Job gracefully: SIGTERM to its entrypoint, so every rank finishes its step and saves a "
             "checkpoint (`trainer.resume=auto` continues it); Ray kills the job if it has not stopped "
             "within its --stop-grace (set at submit).",
             [(("--no-wait",), "return once the stop is requested")],
             ("--grace", 0, "seconds to wait for the job to save and stop (default: its --stop-grace + 60)")),
}
STOP_GRACE_S = 300  # default `submit --stop-grace`: a checkpoint of a large model to object storage fits
RAY_STOP_MARGIN_S = 30  # Ray's SIGKILL comes this long after the driver's own abort (SHEEPOP_STOP_GRACE_S)


def _job_command(command: str, argv: list[str]) -> tuple:
    """(args, client, info, address) of a command about one job (JOB_COMMANDS); one-line errors."""
    description, flags, timeout = JOB_COMMANDS[command]
    p = _parser(command, description)
    p.add_argument("job_id")
    for names, help_ in flags:
        p.add_argument(*names, action="store_true", help=help_)
    if timeout:
        p.add_argument(timeout[0], dest="timeout", type=float, default=timeout[1], help=timeout[2])
    args = p.parse_args(argv)
    return (args, *open_job(args))


# ---------------------------------------------------------------------------------------------
# connecting


def resolve_address(arg: str | None) -> str:
    """--address, else $RAY_ADDRESS, else the local default; always an http(s) URL."""
    address = (arg or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")
    if address == "auto":
        address = DEFAULT_ADDRESS
    if address.startswith("ray://"):
        raise UserError(f"--address={address}: Ray Jobs talk to the dashboard; use http://HOST:8265 "
                        "(not the ray:// client port)")
    if "://" not in address:
        address = f"http://{address}"
    if urlparse(address).scheme not in ("http", "https"):
        raise UserError(f"--address={address}: expected http://HOST:PORT of the Ray dashboard")
    return address


def connect(address: str):
    """A JobSubmissionClient, after a quick TCP check (requests has no timeout by default)."""
    u = urlparse(address)
    host, port = u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 8265)
    require_listening(host, port, f"--address={address}", "start a cluster (`ray start --head --dashboard-host "
                      "127.0.0.1`) or fix --address/$RAY_ADDRESS", timeout=5)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, version check, authentication
        if "Authentication required" in str(e) or "authentication token" in str(e).lower():
            raise UserError(f"--address={address}: the cluster wants Ray's token ({_first_line(e)}); export "
                            f"RAY_AUTH_MODE=token, with the head node's ~/.ray/auth_token in this machine's "
                            f"~/.ray/auth_token") from None
        raise UserError(f"--address={address}: not a Ray dashboard that accepts jobs ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def job_info(client, job_id: str, address: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"no job '{job_id}' at {address}; `sheepop jobs` lists them") from None
        raise UserError(f"job '{job_id}': {_first_line(e)}") from None


def wait_for(client, job_id: str, address: str, timeout: float | None, poll: float):
    """Poll the job until it ends (SUCCEEDED, FAILED, STOPPED) or `timeout` seconds pass
    (None: no limit; 0: one look); returns the last info seen, ended or not."""
    deadline = None if timeout is None else time.monotonic() + timeout
    info = job_info(client, job_id, address)
    while info.status.value not in TERMINAL and (deadline is None or time.monotonic() < deadline):
        time.sleep(poll)
        info = job_info(client, job_id, address)
    return info


def open_job(args) -> tuple:
    """(client, info, address) for the job named on the command line; one-line errors otherwise."""
    address = resolve_address(args.address)
    client = connect(address)
    return client, job_info(client, args.job_id, address), address


def dashboard_url(address: str, job_id: str) -> str:
    return f"{address}/#/jobs/{job_id}"


# ---------------------------------------------------------------------------------------------
# what a submission holds: overrides per job, the files, the environment


def parse_overrides(overrides: list[str]):
    """Hydra's own override parser; a syntax error is one UserError line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise UserError(f"bad override: {_first_line(e)}") from None


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job. Sweeps (`a=1,2`, `range(...)`) are expanded by Hydra's
    BasicSweeper (through sheepop.compat); every other override is passed on exactly as typed."""
    from sheepop.compat import hydra_sweep_combinations

    parsed = parse_overrides(overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise UserError(f"'{sweeps[0].input_line}' is a sweep: add -m to submit one job per combination")
    if not sweeps:
        return [list(overrides)]
    try:
        combos = hydra_sweep_combinations(sweeps)
    except Exception as e:  # e.g. interval(...) sweeps, which BasicSweeper cannot enumerate
        raise UserError(f"cannot expand sweep: {_first_line(e)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    return [fixed + list(combo) for combo in combos]


def _key(override) -> str:
    return override.key_or_group


def plan_jobs(overrides: list[str], multirun: bool, force: bool = False) -> list[dict]:
    """Compose and validate every job's config here; pin each job's run.dir.

    run.dir is resolved locally (so `${now:...}` means submission time, not start time on the
    cluster) and passed explicitly. When a sweep would give several jobs the same run.dir,
    each gets `<run.dir>/<n>`, like Hydra's multirun subdirectories.
    """
    from sheepop.compat import hydra_escape
    from sheepop.config import compose, wandb_mode

    jobs = []
    for job_overrides in expand(overrides, multirun):
        keys = {_key(o) for o in parse_overrides(job_overrides)}
        base = job_overrides if "cluster" in keys else ["cluster=ray", *job_overrides]
        cfg = compose(base)
        if cfg.cluster.kind != "ray":
            raise UserError(f"cluster={cfg.cluster.name} has kind={cfg.cluster.kind}; a submitted job connects "
                            "to the cluster it runs on: use cluster=ray or a preset with kind: ray")
        if not force and str(cfg.cluster.use_gpu).lower() != "false":
            from sheepop.plan import check_fits

            fits, message = check_fits(cfg)  # the same check as `sheepop plan`
            if not fits:
                raise UserError(f"{message} (--force submits anyway)")
        online = cfg.logger.kind == "wandb" and wandb_mode(cfg.logger.mode) == "online"
        jobs.append({"overrides": base, "run_dir": str(cfg.run.dir), "keys": keys, "wandb_online": online,
                     "storage": (cfg.cluster.storage_path, cfg.run.name) if cfg.cluster.storage_path else None})
    dirs = [j["run_dir"] for j in jobs]
    if len(set(dirs)) < len(dirs):
        for n, j in enumerate(jobs):
            j["run_dir"] = f"{j['run_dir'].rstrip('/')}/{n}"
    # Jobs that would share <storage_path>/<run.name> get a name each, as they get a run.dir each.
    places = [j["storage"] for j in jobs if j["storage"]]
    shared = len(set(places)) < len(places)
    for n, j in enumerate(jobs):
        pinned = {"run.dir": j["run_dir"]}
        if shared and j["storage"]:
            pinned["run.name"] = f"{j['storage'][1]}-{n}"
        kept = [o.input_line for o in parse_overrides(j["overrides"]) if _key(o) not in pinned]
        j["overrides"] = kept + [f"{k}={hydra_escape(v)}" for k, v in pinned.items()]
        j.pop("keys")
        j.pop("storage")
    return jobs


def entrypoint(python: str, overrides: list[str]) -> str:
    """The shell command Ray runs on the head node; every override is shell-quoted."""
    return " ".join([shlex.quote(python), "-m", "sheepop.cli", "train", *map(shlex.quote, overrides)])


def upload_files(working_dir: Path, excludes: list[str]) -> list[tuple[Path, int]]:
    """The files Ray would upload, walked with Ray's own rules (excludes + .gitignore/.rayignore)."""
    from sheepop.compat import ray_upload_files

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    files: list[tuple[Path, int]] = []

    def add(path: Path) -> None:
        if path.is_file():
            files.append((path, path.stat().st_size))

    quiet = logging.getLogger("sheepop.upload")  # Ray logs every .gitignore it reads at INFO
    quiet.setLevel(logging.WARNING)
    ray_upload_files(working_dir, excludes, add, include_gitignore, quiet)
    return files


def upload_limit() -> int:
    from sheepop.compat import ray_upload_limit

    return ray_upload_limit()


def check_upload(working_dir: Path, excludes: list[str]) -> list[tuple[Path, int]]:
    """The files to upload, (path, size) each; UserError when the sum could exceed Ray's package
    limit or a file holds what looks like a credential (find_secrets).

    Ray zips the folder and refuses packages over its gRPC limit (512 MiB) only after zipping
    and starting the upload; summing file sizes here fails in a second instead, before anything
    is sent (the zip is rarely larger than its contents)."""
    files = upload_files(working_dir, excludes)
    total, limit = sum(s for _, s in files), upload_limit()
    if total >= limit:
        top = sorted(files, key=lambda f: -f[1])[:3]
        biggest = ", ".join(f"{p.relative_to(working_dir)} ({_mib(s)})" for p, s in top)
        raise UserError(f"working dir {working_dir} has {_mib(total)} to upload, over Ray's {_mib(limit)} limit "
                        f"(largest: {biggest}); move data to shared storage, list it in .rayignore, "
                        "or pass --exclude PATTERN")
    hits = find_secrets(files)
    if hits:
        rels = [p.relative_to(working_dir).as_posix() for p, _, _ in hits]
        shown = list(zip(rels, hits))[:5]
        named = ", ".join(f"{rel} (line {line}) looks like it holds {what}" for rel, (_, line, what) in shown)
        more = f", and {len(hits) - len(shown)} more file(s)" if len(hits) > len(shown) else ""
        raise UserError(f"not uploading {working_dir}: {named}{more}; remove the credential, or leave the file out "
                        f"with --exclude PATTERN ({' '.join('--exclude ' + shlex.quote(rel) for rel, _ in shown)})")
    return files


# ---------------------------------------------------------------------------------------------
# credentials in the files to upload, found by what they hold (EXCLUDES only goes by name)

SCAN_MAX_BYTES = 5 * 2**20  # larger files are data or models, not credential files: not read

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# a literal value: not empty, not $VAR, <placeholder> or {{ template }}
_AWS_SECRET_SET = re.compile(r"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[^\s\"'$<{]", re.I)
_PEM_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]{0,400}?[A-Za-z0-9+/]{40}")
_WANDB_KEY = re.compile(r"(?:wandb[\w.-]*[\"']?\s*[:=]|\bwandb\s+login(?:\s+--?[\w-]+)*)\s*[\"']?[0-9a-f]{40}\b", re.I)
_NETRC_WANDB = re.compile(r"\bmachine\s+api\.wandb\.ai\b(?:(?!\bmachine\b)[\s\S]){0,500}?\bpassword\s+[0-9a-f]{40}\b",
                          re.I)
_GCP_TYPE = re.compile(r"\"type\"\s*:\s*\"service_account\"")
_GCP_KEY = re.compile(r"\"private_key\"\s*:\s*\"-----BEGIN")
_GITHUB_TOKEN = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b")
_SLACK_TOKEN = re.compile(r"\bxox[bap]-[0-9]+-[0-9A-Za-z-]{10,}")


def _aws_key(text: str) -> re.Match | None:
    """An access key id with its secret beside it (an id alone cannot sign anything). AWS's
    documentation examples (AKIA...EXAMPLE, as test fixtures use them) are not keys."""
    key_id = next((m for m in _AWS_KEY_ID.finditer(text) if not m.group().endswith("EXAMPLE")), None)
    if key_id is None:
        return None
    secret = _AWS_SECRET_SET.search(text) or any(
        re.search("[a-z]", v) and re.search("[A-Z]", v) for v in _AWS_SECRET.findall(text))
    return key_id if secret else None


def _gcp_key(text: str) -> re.Match | None:
    kind = _GCP_TYPE.search(text)
    return _GCP_KEY.search(text) if kind else None


# What the error calls a credential (never its value), words one of its kind always holds (in
# lower case: a quick test that spares the regex most files), and how to find it.
SECRET_FORMATS = [
    ("a GCP service-account key", ("service_account",), _gcp_key),  # before PEM: such a file holds one too
    ("an AWS access key id and secret key", ("akia", "asia"), _aws_key),
    ("a PEM private key", ("private key",), _PEM_KEY.search),
    ("a W&B API key", ("wandb",), _WANDB_KEY.search),
    ("a W&B API key (netrc login for api.wandb.ai)", ("api.wandb.ai",), _NETRC_WANDB.search),
    ("a GitHub token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), _GITHUB_TOKEN.search),
    ("a Slack token", ("xoxb-", "xoxa-", "xoxp-"), _SLACK_TOKEN.search),
]


def find_secrets(files: list[tuple[Path, int]]) -> list[tuple[Path, int, str]]:
    """(path, line, what) for each file that holds something shaped like a credential (the first
    found); files over SCAN_MAX_BYTES and binary files (a NUL byte in the first 8 KiB) are skipped."""
    hits = []
    for path, size in files:
        if size > SCAN_MAX_BYTES:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(8192)
                if b"\0" in data:
                    continue
                data += f.read()
        except OSError:
            continue
        text = data.decode("utf-8", "replace")
        lower = text.lower()
        for what, words, find in SECRET_FORMATS:
            found = find(text) if any(w in lower for w in words) else None
            if found is not None:
                hits.append((path, text.count("\n", 0, found.start()) + 1, what))
                break
    return hits


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def default_working_dir() -> Path:
    """The folder holding conf/ (and, in a checkout, the sheepop package)."""
    from sheepop.config import conf_dir

    return conf_dir().parent


def forwarded_env(names: list[str], wandb_online: bool = True) -> dict[str, str]:
    """Values of the named variables from this environment; a named one that is unset fails.
    wandb_online: some job logs to W&B online (else its key is not forwarded unless named)."""
    env = {k: os.environ[k] for k in DEFAULT_FORWARD if k in os.environ and (wandb_online or k not in SECRETS)}
    for name in names:
        if not name.replace("_", "").isalnum() or name[0].isdigit():
            raise UserError(f"--env {name}: expected an environment variable NAME (its value is read from "
                            "your environment, never from the command line)")
        if name not in os.environ:
            raise UserError(f"--env {name}: not set in this environment; export it first")
        env[name] = os.environ[name]
    return env


def runtime_env(working_dir: Path, excludes: list[str], env: dict[str, str], stop_grace: float = STOP_GRACE_S) -> dict:
    from sheepop.compat import RAY_JOB_ENV
    from sheepop.driver.stop_forwarder import GRACE_ENV

    # `sheepop stop` is Ray's SIGTERM to the entrypoint: the driver has stop_grace seconds to let
    # every rank save (then it aborts), and Ray's own SIGKILL (after RAY_JOB_STOP_WAIT_TIME_S, 3 s by
    # default) comes a margin later; the job's supervisor reads it from these env_vars.
    grace = {GRACE_ENV: f"{stop_grace:g}", "RAY_JOB_STOP_WAIT_TIME_S": str(int(stop_grace + RAY_STOP_MARGIN_S))}
    return {"working_dir": str(working_dir), "excludes": excludes, "env_vars": {**env, **grace, **RAY_JOB_ENV}}


# ---------------------------------------------------------------------------------------------
# commands


def submit_main(argv: list[str]) -> int:
    p = _parser("submit", "Submit `sheepop train` to a Ray cluster as a Ray Job (Hydra overrides as for train).")
    p.add_argument("-m", "--multirun", action="store_true", help="one job per combination of the sweeps (a=1,2)")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help=f"forward this environment variable (repeatable); always forwarded when set: "
                        f"{', '.join(DEFAULT_FORWARD)}")
    p.add_argument("--working-dir", default=None, help="folder to upload (default: the one holding conf/)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="another .gitignore-style pattern not to upload (repeatable)")
    p.add_argument("--python", default="python", help="Python on the head node that runs the entrypoint")
    p.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its final state")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; contact nothing")
    p.add_argument("--force", action="store_true", help="submit even when `sheepop plan` says it will not fit")
    p.add_argument("--stop-grace", type=float, default=STOP_GRACE_S, metavar="SECONDS",
                   help=f"after `sheepop stop`, how long the ranks may take to save before the job is killed "
                        f"(default {STOP_GRACE_S})")
    args, overrides = p.parse_known_args(argv)
    flags = [o for o in overrides if o.startswith("-")]
    if flags:
        raise UserError(f"unknown option '{flags[0]}'; options: -m, --address, --env, --working-dir, --exclude, "
                        "--python, --follow, --dry-run, --force, --stop-grace (everything else is a Hydra override)")
    if args.stop_grace <= 0:
        raise UserError(f"--stop-grace={args.stop_grace:g}: must be > 0 seconds (default {STOP_GRACE_S})")

    jobs = plan_jobs(overrides, args.multirun, args.force)  # bad overrides / runs that cannot fit fail here
    if args.follow and len(jobs) > 1:
        raise UserError(f"--follow follows one job; this sweep makes {len(jobs)} (use `sheepop logs ID --follow`)")
    wd = Path(args.working_dir or default_working_dir()).expanduser().resolve()
    if not wd.is_dir():
        raise UserError(f"--working-dir={wd}: no such directory")
    excludes = EXCLUDES + list(args.exclude)
    files = check_upload(wd, excludes)  # too large, or a credential in a file: fails here
    env = forwarded_env([n for arg in args.env for n in arg.split(",") if n], any(j["wandb_online"] for j in jobs))
    renv = runtime_env(wd, excludes, env, args.stop_grace)
    print(f"working dir {wd}: {len(files)} files, {_mib(sum(s for _, s in files))}; "
          f"forwarding env: {', '.join(sorted(env)) or 'none'}")
    if args.dry_run:  # every file, however many: what would leave this machine
        from sheepop.monitor.report import nbytes

        for rel, size in sorted((p.relative_to(wd).as_posix(), s) for p, s in files):
            print(f"  {nbytes(size):>10}  {rel}")
    for j in jobs:
        if not Path(j["run_dir"]).is_absolute():
            print(f"note: run.dir={j['run_dir']} is relative to the job's temporary working dir on the head node; "
                  "use an absolute path on shared storage to keep the run")
            break

    if args.dry_run:
        for j in jobs:
            print(entrypoint(args.python, j["overrides"]))
        return 0

    address = resolve_address(args.address)
    client = connect(address)
    _quiet_ray_upload_logs()
    ids = []
    for j in jobs:
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(args.python, j["overrides"]), runtime_env=renv,
                metadata={"sheepop_run_dir": j["run_dir"], "sheepop_overrides": " ".join(j["overrides"])},
            )
        except Exception as e:  # upload refused, runtime_env invalid, server error
            raise UserError(f"submission to {address} failed: {_first_line(e)}"
                            + (f" ({len(ids)} job(s) already submitted: {', '.join(ids)})" if ids else "")) from None
        ids.append(job_id)
        print(f"submitted {job_id}  run.dir={j['run_dir']}  dashboard: {dashboard_url(address, job_id)}", flush=True)
    if len(ids) == 1:
        print(f"follow: sheepop logs {ids[0]} --follow --address {address}")
    if args.follow:
        return _follow(client, ids[0], address)
    return 0


def jobs_main(argv: list[str]) -> int:
    p = _parser("jobs", "List the Ray Jobs on a cluster, oldest first.")
    args = p.parse_args(argv)
    address = resolve_address(args.address)
    client = connect(address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not jobs:
        print(f"no jobs at {address}")
        return 0
    print(f"{'ID':<32} {'STATUS':<10} {'STARTED':<19} {'DURATION':>8}  RUN DIR / ENTRYPOINT")
    for j in jobs:
        meta = j.metadata or {}
        what = meta.get("sheepop_run_dir") or (j.entrypoint or "")[:60]
        print(f"{j.submission_id or j.job_id:<32} {j.status.value:<10} {_time(j.start_time):<19} "
              f"{_took(j.start_time, j.end_time):>8}  {what}")
    return 0


def status_main(argv: list[str]) -> int:
    args, client, info, address = _job_command("status", argv)
    if args.wait:
        info = wait_for(client, args.job_id, address, args.timeout or None, poll=1.0)
        if info.status.value not in TERMINAL:
            print(f"{args.job_id}: still {info.status.value} after {duration(args.timeout)}", file=sys.stderr)
            return 4
    state = info.status.value
    meta = info.metadata or {}
    line = f"{args.job_id}: {state} ({_took(info.start_time, info.end_time)})"
    if meta.get("sheepop_run_dir"):
        line += f"  run.dir={meta['sheepop_run_dir']}"
    if state in ("FAILED", "STOPPED") and info.message:
        line += f"  {_first_line(Exception(info.message))}"
    print(line)
    if args.wait and state != "SUCCEEDED":
        return EXIT_CODE[state] or 1
    return EXIT_CODE.get(state, 1)


def logs_main(argv: list[str]) -> int:
    args, client, _, address = _job_command("logs", argv)
    if args.follow:
        return _follow(client, args.job_id, address)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def stop_main(argv: list[str]) -> int:
    args, client, info, address = _job_command("stop", argv)
    if info.status.value in TERMINAL:
        print(f"{args.job_id}: already {info.status.value}; nothing to stop")
        return 0
    client.stop_job(args.job_id)
    if args.no_wait:
        print(f"{args.job_id}: stop requested")
        return 0
    env = (info.runtime_env or {}).get("env_vars") or {}
    kill_after = float(env.get("RAY_JOB_STOP_WAIT_TIME_S") or 3)  # Ray's SIGKILL after the SIGTERM
    timeout = args.timeout or kill_after + RAY_STOP_MARGIN_S
    info = wait_for(client, args.job_id, address, timeout, poll=0.5)
    if info.status.value not in TERMINAL:
        print(f"{args.job_id}: still {info.status.value} {duration(timeout)} after the stop request; Ray kills it "
              f"{duration(kill_after)} after the request", file=sys.stderr)
        return 1
    print(f"{args.job_id}: {info.status.value}")
    return 0


def _quiet_ray_upload_logs() -> None:
    """Ray logs each .gitignore it reads and warns that it skips .git/.venv (so do we); keep
    its real warnings (a single file over 10 MiB, a package near the limit)."""
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..." at INFO


def _follow(client, job_id: str, address: str) -> int:
    """Stream logs until the job ends; exit code follows its final state."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the socket closed before the job ended (head restarted, network)
        print(f"sheepop: log stream of {job_id} ended early: {_first_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:  # only the stream stops: the job lives on the cluster
        print(f"\nstopped following; {job_id} keeps running (`sheepop stop {job_id} --address {address}` ends it)",
              file=sys.stderr)
        return 130
    info = wait_for(client, job_id, address, 10, poll=0.5)  # the stream can close a moment before the state is final
    state = info.status.value
    print(f"{job_id}: {state}", file=sys.stderr)
    return EXIT_CODE[state] if state in TERMINAL else 4


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _took(start_ms: int | None, end_ms: int | None) -> str:
    """How long a job ran (or has been running), from Ray's millisecond timestamps."""
    return duration(((end_ms or time.time() * 1000) - start_ms) / 1000) if start_ms else "-"
