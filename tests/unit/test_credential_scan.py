"""`sheepop submit` refuses to upload a file that holds a credential, whatever its name (EXCLUDES
only goes by name). Each fake key is put together at run time, so this file itself holds nothing
the scan would find (the scan runs over this repository too: the last test)."""
from __future__ import annotations

import json
import re

import pytest

from sheepop.errors import UserError
from tests.helpers import ROOT, one_error_line, sheepop

DASHES = "-" * 5
KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" * 2 + "\n" + "Ab1/" * 16 + "\n"
AWS_ID = "AKIA" + "Z7Q3" * 4
AWS_SECRET = "Ab1/" * 10  # 40 characters, upper and lower case
HEX40 = "5f3c" * 10


def pem(kind: str = "") -> str:
    return f"{DASHES}BEGIN {kind}PRIVATE KEY{DASHES}\n{KEY_BODY}{DASHES}END {kind}PRIVATE KEY{DASHES}\n"


# file name → (content, what the error calls it): names EXCLUDES does not catch
SECRETS = {
    ".aws_config": (f"[default]\naws_access_key_id = {AWS_ID}\naws_secret_access_key = {AWS_SECRET}\n",
                    "AWS access key id and secret key"),
    "deploy/env.sh": (f"export AWS_ACCESS_KEY_ID={AWS_ID}\nexport AWS_SECRET_ACCESS_KEY={AWS_SECRET}\n",
                      "AWS access key id and secret key"),
    "settings.py": (f"KEYS = {{'id': '{AWS_ID}', 'secret': '{AWS_SECRET}'}}\n", "AWS access key id and secret key"),
    "tls/server-key.txt": (pem("RSA "), "PEM private key"),
    "keys/deploy": (pem("OPENSSH "), "PEM private key"),
    "prod-creds.json": (json.dumps({"type": "service_account", "project_id": "p", "private_key_id": "0" * 8,
                                    "private_key": pem(), "client_email": "x@p.iam.gserviceaccount.com"}, indent=2),
                        "GCP service-account key"),
    "run.sh": (f"WANDB_API_KEY={HEX40} python train.py\n", "W&B API key"),
    "conf/logging.yaml": (f"wandb:\n  project: p\nwandb_key: '{HEX40}'\n", "W&B API key"),
    "setup/netrc": (f"machine api.wandb.ai\n  login user\n  password {HEX40}\n", "W&B API key"),
    "ci/token.txt": ("ghp_" + "a1B2" * 9 + "\n", "GitHub token"),
    "ci/pat.txt": ("GH=" + "github_pat_" + "11A" + "b2" * 9 + "c_" + "D4e" * 19 + "f2\n", "GitHub token"),
    "notify.py": ("SLACK = '" + "xoxb-" + "1234567890-" + "987654321098-" + "AbCdEfGhIjKlMnOpQrStUvWx'\n",
                  "Slack token"),
}

# Look-alikes that are not credentials: none of these may be refused.
CLEAN = {
    "sheepop/x.py": "import re\nKEY = re.compile(r'(?:AKIA|ASIA)[A-Z0-9]{16}')\n",
    "docs/aws.md": "Set `aws_secret_access_key = ${AWS_SECRET_ACCESS_KEY}` in the profile; never commit it.\n",
    "tests/fixture.py": 'KEY, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n',  # docs'
    "docs/rotation.md": f"Key {AWS_ID} was rotated on Monday (an id alone signs nothing).\n",
    "docs/tls.md": f"A key file starts with `{DASHES}BEGIN PRIVATE KEY{DASHES}`; keep it out of the repo.\n",
    "sa.json": json.dumps({"type": "service_account", "private_key": "", "client_email": "x@p"}),
    "launch.sh": "export WANDB_API_KEY=$WANDB_API_KEY\nexport WANDB_MODE=offline\n",
    "conf/wandb.yaml": f"wandb_project: demo\ncommit: {HEX40}\n",  # a git hash, not assigned to a wandb name
    "notes.txt": f"netrc for api.example.com:\nmachine api.example.com login u password {HEX40}\n",
    "tok.py": "PREFIXES = ('ghp_', 'github_pat_', 'xoxb-')\n",
}


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("rel", sorted(SECRETS))
def test_each_credential_format_is_refused_naming_the_file_not_the_value(tmp_path, rel):
    from sheepop.cli.jobs import EXCLUDES, check_upload

    text, what = SECRETS[rel]
    _tree(tmp_path, {"train.py": "print('hi')\n", rel: "# first line\n" + text})
    with pytest.raises(UserError) as e:
        check_upload(tmp_path, EXCLUDES)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.search(rf" {re.escape(rel)} \(line \d+\) looks like it holds an? {re.escape(what)}\b", msg), msg
    assert f"--exclude {rel}" in msg and "remove" in msg and "train.py" not in msg
    assert not any(v in msg for v in (AWS_ID, AWS_SECRET, HEX40, "a1B2", "xoxb", "ghp_", "Ab1/")), msg
    files = check_upload(tmp_path, [*EXCLUDES, rel])  # what the message suggests
    assert [p.relative_to(tmp_path).as_posix() for p, _ in files] == ["train.py"]


def test_look_alikes_binary_and_large_files_pass(tmp_path):
    from sheepop.cli.jobs import EXCLUDES, SCAN_MAX_BYTES, check_upload, find_secrets

    _tree(tmp_path, CLEAN)
    key = SECRETS["run.sh"][0]
    (tmp_path / "weights.dat").write_bytes(b"\0\1\2" + key.encode())  # binary: not read
    (tmp_path / "corpus.txt").write_text(key + "x" * SCAN_MAX_BYTES)  # data, over the size limit: not read
    files = check_upload(tmp_path, EXCLUDES)
    assert len(files) == len(CLEAN) + 2
    (tmp_path / "small.txt").write_text(key)
    assert [(p.name, line) for p, line, _ in find_secrets([(tmp_path / "small.txt", len(key))])] == [("small.txt", 1)]


def test_submit_refuses_in_one_line_before_contacting_anyone(tmp_path):
    """Through the CLI, --dry-run included (it runs the same check); all files are named."""
    wd = _tree(tmp_path / "wd", {"train.py": "", ".aws_config": SECRETS[".aws_config"][0],
                                 "prod-creds.json": SECRETS["prod-creds.json"][0]})
    args = ("submit", "--dry-run", "--working-dir", str(wd), "model=tiny", "run.dir=/tmp/sheepop-never-written")
    line = one_error_line(sheepop(*args))
    assert ".aws_config (line 2) looks like it holds an AWS access key id and secret key" in line
    assert "prod-creds.json (line 5) looks like it holds a GCP service-account key" in line
    assert "--exclude .aws_config --exclude prod-creds.json" in line and AWS_SECRET not in line
    r = sheepop(*args, "--exclude", ".aws_config", "--exclude", "prod-creds.json")
    assert r.returncode == 0 and "train.py" in r.stdout and ".aws_config" not in r.stdout, r.stdout + r.stderr


def test_this_repository_passes_its_own_scan():
    """What `sheepop submit` uploads from a checkout: the code, tests (fixtures, the scanner's own
    regexes, this file), docs and cluster definitions. None of it may look like a credential."""
    from sheepop.cli.jobs import EXCLUDES, check_upload

    files = check_upload(ROOT, EXCLUDES)
    assert any(p.name == "test_credential_scan.py" for p, _ in files)  # a name EXCLUDES lets through
