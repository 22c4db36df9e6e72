"""Checks of a local path a command is about to write, made before any work starts.

One line names the path and what would be valid; nothing the user already has is replaced by
accident: an existing path needs --force, and some paths (the run being exported, the files
being prepared) are never replaced, --force or not. URIs (s3://, gs://) are not checked here:
object storage has no parents to be files and no folders to replace.
"""
from __future__ import annotations

import os
from pathlib import Path

from sheepop.errors import UserError

KINDS = ("file", "folder")


def check(raw: str | Path, key: str, *, kind: str, force: bool = False,
          keep: tuple[tuple[Path, str], ...] = (), not_inside: tuple[tuple[Path, str], ...] = ()) -> Path:
    """The path `raw` (given as `key=raw`) as a Path, once it is fit to be written as a `kind`.

    force: an existing path may be replaced (else refused).
    keep: (path, what it is): refused when `raw` is one of them or a folder above one, since
    replacing it would delete that, --force or not.
    not_inside: (folder, what it is): refused when `raw` lies inside one (writing there would
    change what that folder holds, e.g. a run's checkpoints)."""
    if kind not in KINDS:
        raise ValueError(f"output_paths.check: kind={kind!r}; one of {KINDS}")
    text = str(raw)
    if not text.strip():
        raise UserError(f"{key}= is empty; give a {kind} path")
    if kind == "file" and text.endswith(("/", os.sep)):
        raise UserError(f"{key}={text} names a folder; give a file path (e.g. {text.rstrip('/')}/model.pt)")
    path = Path(text).expanduser()
    full = path.resolve()
    for other, what in keep:
        other = Path(other).expanduser().resolve()
        if full == other or full in other.parents:
            raise UserError(f"{key}={text} would replace {what} ({other}); give a path outside it")
    for folder, what in not_inside:
        folder = Path(folder).expanduser().resolve()
        if full == folder or folder in full.parents:
            raise UserError(f"{key}={text} is inside {what} ({folder}); give a path outside it")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise UserError(f"{key}={text} is a folder; give a file path")
        if kind == "folder" and not path.is_dir():
            raise UserError(f"{key}={text} is a file; give a folder")
        if not force:
            raise UserError(f"{key}={text} already exists; pass --force to replace it")
    parent = next(p for p in full.parents if p.exists())  # the nearest folder (or file) that is there
    if not parent.is_dir():
        raise UserError(f"{key}={text}: {parent} is a file, not a folder; give a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{key}={text}: {parent} is not writable; give a path where you can write")
    return path
