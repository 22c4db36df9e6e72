"""Where a run's files live: a local folder or an object store, behind one small set of functions.

A location is a string: a local path (`/runs/a`, `outputs/x`) or a URI (`s3://bucket/prefix`,
`gs://bucket/prefix`, any scheme pyarrow knows, and fsspec's through pyarrow's FSSpecHandler).
Checkpoints, the run's mirrored files, prepared data and the commands that read a run all go
through here, so nothing assumes a disk that every node shares.

Credentials and endpoints never come from sheepop's config: S3 reads the standard AWS_*
variables (AWS_ENDPOINT_URL for a custom endpoint, AWS_ACCESS_KEY_ID/..., AWS_PROFILE) or the
machine's role; GCS its application-default credentials, or STORAGE_EMULATOR_HOST (the variable
Google's own clients read) for a GCS emulator such as fake-gcs-server.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

_fs_cache: dict[tuple[str, str], object] = {}


def is_uri(location: str | Path) -> bool:
    """True for object-store (or any non-local) URIs; file:// counts as local."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_path(location: str | Path) -> Path:
    s = str(location)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser()


def normalize(location: str | Path) -> str:
    """An absolute local path, or the URI without a trailing slash."""
    if is_uri(location):
        return str(location).rstrip("/")
    return str(local_path(location).absolute())


def join(location: str | Path, *parts: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(local_path(location).joinpath(*parts))


def name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def filesystem(location: str | Path):
    """(pyarrow filesystem, path inside it) for a location."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(local_path(location).absolute())
    u = urlparse(str(location))
    # The endpoint and credentials come from the environment: a changed one needs a new client.
    key = (u.scheme, u.netloc, os.environ.get("AWS_ENDPOINT_URL", ""), os.environ.get("AWS_ACCESS_KEY_ID", ""),
           os.environ.get("STORAGE_EMULATOR_HOST", ""))
    fs = _fs_cache.get(key)
    path = (u.netloc + u.path).rstrip("/")
    if fs is None and u.scheme in GCS_SCHEMES and os.environ.get("STORAGE_EMULATOR_HOST"):
        e = urlparse(gcs_endpoint())  # pyarrow's GCS client reads no endpoint variable: set it here
        fs = _fs_cache[key] = pafs.GcsFileSystem(anonymous=True, endpoint_override=e.netloc, scheme=e.scheme)
    if fs is None:
        try:
            fs, path = pafs.FileSystem.from_uri(str(location))
        except (pafs.ArrowInvalid, ValueError, OSError) as e:
            if "Unrecognized filesystem type" not in str(e) and "unknown" not in str(e).lower():
                raise
            import fsspec

            ffs, path = fsspec.core.url_to_fs(str(location))
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
        _fs_cache[key] = fs
    return fs, path.rstrip("/")


def for_ray_train(location: str) -> dict:
    """RunConfig's storage arguments: Ray Train writes with the filesystem sheepop reads with (the
    same endpoint: pyarrow's GCS client, for one, would not find an emulator by itself)."""
    if not is_uri(location):
        return {"storage_path": location}
    fs, path = filesystem(location)
    return {"storage_path": path, "storage_filesystem": fs}


def _foreground_writes(fs):
    """The same S3 filesystem (endpoint, credentials, region: pyarrow's own pickling form) with
    background_writes off; any other filesystem as it is."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    key = ("foreground", id(fs))
    if key not in _fs_cache:
        rebuild, (options,) = fs.__reduce__()
        _fs_cache[key] = rebuild({**options, "background_writes": False})
    return _fs_cache[key]


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def listdir(location: str | Path) -> list[str]:
    """Names of the entries directly inside a folder ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if isinstance(fs, pafs.GcsFileSystem):
        from sheepop import compat

        return compat.gcs_listdir(fs, path)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def sizes(location: str | Path) -> dict[str, int]:
    """{relative path: size} of every file below a folder."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file; local writes go through a temporary name (readers never see half a file)."""
    if not is_uri(location):
        p = local_path(location)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:  # an object appears only when its upload completes
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def remove(location: str | Path) -> None:
    """Delete a file or a folder with everything in it (nothing if it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        if isinstance(fs, pafs.GcsFileSystem):
            from sheepop import compat

            compat.gcs_delete_dir(fs, path)
        else:
            fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload(local_dir: str | Path, location: str | Path, files: list[str] | None = None,
           in_this_thread: bool = False) -> None:
    """Copy files (relative paths; default: all) from a local folder to a location. in_this_thread:
    the calling thread writes every part itself (pyarrow's S3 client otherwise hands multipart
    parts to its own I/O threads), so that a thread that lowered its CPU priority keeps all of the
    upload's CPU work at that priority."""
    local_dir = Path(local_dir)
    files = files if files is not None else [str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file()]
    if not is_uri(location):
        dst = local_path(location)
        for rel in files:
            # Through a temporary name, as an object store does it: a rank reading another rank's
            # manifest while it is being copied (checkpoint_files.prune) sees it whole or not at all.
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(local_dir / rel, tmp)
            tmp.replace(target)
        return
    fs, path = filesystem(location)
    if in_this_thread:
        fs = _foreground_writes(fs)
    for rel in files:
        with open(local_dir / rel, "rb") as src, fs.open_output_stream(f"{path}/{rel}") as out:
            shutil.copyfileobj(src, out, length=8 * 2**20)


def download(location: str | Path, local_dir: str | Path, files: list[str] | None = None, keep=None) -> Path:
    """Copy files (relative paths; default: all) from a location into a local folder; returns it.

    keep(rel, path) -> bool: whether a copy already in local_dir is still the file in storage (no
    download then). Default: never; a cache must say how it knows (a size alone does not: a run or
    data rewritten at the same URI has files of the same sizes and other bytes)."""
    local_dir = Path(local_dir)
    wanted = files if files is not None else list(sizes(location))
    fs, path = filesystem(location)
    for rel in wanted:
        dst = local_dir / rel
        if keep is not None and dst.is_file() and keep(rel, dst):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        with fs.open_input_stream(f"{path}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=8 * 2**20)
        tmp.replace(dst)
    return local_dir


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir(location: str | Path) -> Path:
    """The local folder that mirrors a remote location on this machine (a local location is itself)."""
    if not is_uri(location):
        return local_path(location)
    base = os.environ.get("SHEEPOP_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sheepop"
    u = urlparse(str(location))
    return Path(base) / "storage" / u.scheme / u.netloc / u.path.strip("/")


# --- checks before anything starts -------------------------------------------------------------

CHECK_SECONDS = 8.0  # the whole check answers within this, whatever the network does
GCS_SCHEMES = ("gs", "gcs")


def gcs_endpoint() -> str:
    """The GCS endpoint requests go to: STORAGE_EMULATOR_HOST (an emulator), else Google's own."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").rstrip("/")
    if emulator:
        return emulator if "://" in emulator else f"http://{emulator}"
    return "https://storage.googleapis.com"


def endpoint(location: str) -> str | None:
    """The object store a URI's requests go to (S3 and GCS), else None."""
    scheme = urlparse(location).scheme
    return s3_endpoint() if scheme == "s3" else gcs_endpoint() if scheme in GCS_SCHEMES else None


def s3_endpoint() -> str:
    """The S3 endpoint requests go to: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS's own."""
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if custom:
        return custom.rstrip("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return f"https://s3.{region}.amazonaws.com"


def s3_credential_source() -> str | None:
    """Where S3 credentials would come from without asking the network, or None. An instance
    or pod role is found only by asking the metadata service, which the SDK does itself: that
    counts as a source unless AWS_EC2_METADATA_DISABLED says there is none."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID"
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "AWS_WEB_IDENTITY_TOKEN_FILE"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials"
    files = [Path(env.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials")),
             Path(env.get("AWS_CONFIG_FILE", Path.home() / ".aws" / "config"))]
    if any(f.is_file() and "aws_access_key_id" in f.read_text(errors="replace") for f in files):
        return f"profile {env.get('AWS_PROFILE', 'default')}"
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return "instance metadata (role)"
    return None


def check_writable(location: str, setting: str) -> None:
    """One UserError line, within CHECK_SECONDS, when a run could not write to `location`:
    unreachable endpoint, missing credentials, a bucket that does not exist, no write permission."""
    from sheepop.errors import UserError

    if not is_uri(location):
        p = local_path(location)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / f".sheepop-write-check-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            also = "" if setting in ("run.dir", "cluster.checkpoint_staging") else " or an object-store URI (s3://bucket/prefix)"
            raise UserError(f"{setting}={location}: cannot write there ({e.strerror or e}); "
                            f"valid: a writable folder{also}") from None
        return

    def probe_write(fs, path: str) -> None:
        target = f"{path}/.sheepop-write-check-{os.getpid()}"
        with fs.open_output_stream(target) as f:
            f.write(b"")
        fs.delete_file(target)

    _probe(location, setting, probe_write, "write", "create it first or fix the URI")


def _probe(location: str, setting: str, probe, what: str, no_bucket: str) -> None:
    """The object-store checks of check_writable/check_readable: the endpoint answers, credentials
    exist, the bucket exists, then probe(fs, path) succeeds; one UserError line within
    CHECK_SECONDS (the SDK's own retries can take minutes: the probe runs in a thread)."""
    import threading

    import pyarrow.fs as pafs

    from sheepop.errors import UserError

    if endpoint(location):
        _check_reachable(location, setting)
    if urlparse(location).scheme == "s3" and s3_credential_source() is None:
        raise UserError(f"{setting}={location}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where a role provides them)")
    outcome: list = []

    def run() -> None:
        try:
            fs, path = filesystem(location)
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                outcome.append(UserError(f"{setting}={location}: bucket '{bucket}' does not exist; {no_bucket}"))
                return
            probe(fs, path)
            outcome.append(None)
        except UserError as e:
            outcome.append(e)
        except Exception as e:  # pyarrow raises OSError with the SDK's message
            outcome.append(UserError(f"{setting}={location}: {refusal(str(e), what)}"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(CHECK_SECONDS)
    if not outcome:
        raise UserError(f"{setting}={location}: no answer within {CHECK_SECONDS:g} s"
                        + (f" from {endpoint(location)}" if endpoint(location) else ""))
    if outcome[0] is not None:
        raise outcome[0]


def refusal(msg: str, what: str) -> str:
    """The reason in an object store's error message, in a few words."""
    if "NETWORK_CONNECTION" in msg or "curlCode" in msg or "Could not connect" in msg:
        return "the storage endpoint did not answer"
    if "INVALID_ACCESS_KEY" in msg or "InvalidAccessKeyId" in msg or "SIGNATURE" in msg.upper() \
            or "credential" in msg.lower():
        return "the credentials were refused (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if "ACCESS_DENIED" in msg or "AccessDenied" in msg or "403" in msg:
        return f"no {what} permission (Access Denied)"
    return msg.splitlines()[0][:200]


def check_readable(location: str, setting: str) -> None:
    """One UserError line, within CHECK_SECONDS, when `location` in object storage cannot be read:
    unreachable endpoint, missing or refused credentials, a bucket or a path that is not there.
    Local paths are left to the caller (each names its own files)."""
    import pyarrow.fs as pafs

    from sheepop.errors import UserError

    if not is_uri(location):
        return

    def probe_read(fs, path: str) -> None:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise UserError(f"{setting}={location}: nothing there in the bucket; fix the URI")

    _probe(location, setting, probe_read, "read", "fix the URI")


def _check_reachable(location: str, setting: str) -> None:
    """A TCP connection to the object store's endpoint within 3 s (name resolution included)."""
    import socket
    import threading

    from sheepop.errors import UserError

    where = endpoint(location)
    e = urlparse(where)
    host, port = e.hostname or "", e.port or (443 if e.scheme == "https" else 80)
    problem: list[str] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=3.0):
                problem.append("")
        except OSError as err:
            problem.append(err.strerror or str(err))

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(3.5)
    why = problem[0] if problem else "no answer within 3 s"
    if why:
        fix = "AWS_ENDPOINT_URL" if urlparse(location).scheme == "s3" else "STORAGE_EMULATOR_HOST"
        store = "S3" if urlparse(location).scheme == "s3" else "GCS"
        raise UserError(f"{setting}={location}: cannot reach the {store} endpoint {where} ({why}); "
                        f"set {fix} to a reachable endpoint or check the network")
