"""Writes that a crash cannot leave half done: a file or a folder is built aside, then renamed into place.

Folders written here carry a marker file, and a folder is only ever replaced when it carries one: the suite
never deletes what it did not create.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Yield a handle to a temporary file beside ``path``; on success it is flushed to disk and renamed over
    ``path``, on error removed (the old ``path``, if any, stays whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, document: dict) -> None:
    """``document`` as indented JSON at ``path``, atomically."""
    with atomic_file(path) as handle:
        json.dump(document, handle, indent=2, allow_nan=True)
        handle.write("\n")


MARKER = ".efficientllm-folder"


class NotOurFolder(ValueError):
    """A folder the suite would replace holds files it did not write."""


def recover_folder(path: str | os.PathLike) -> Path:
    """Finish a replacement that a crash interrupted between its two renames: the previous folder, moved
    aside, goes back into place. Returns ``path``."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and (old / MARKER).exists():
        os.replace(old, path)
    return path


def check_ours(path: Path, own_files: frozenset[str] = frozenset()) -> None:
    """Raise NotOurFolder if ``path`` is a non-empty folder that has neither the suite's marker nor only
    ``own_files`` (the names the caller writes: folders of versions before the marker)."""
    if not path.is_dir() or (path / MARKER).exists():
        return
    strangers = sorted(file.name for file in path.iterdir() if file.name not in own_files)
    if strangers:
        raise NotOurFolder(f"{path} holds files this suite did not write ({', '.join(strangers[:3])}"
                           f"{', ...' if len(strangers) > 3 else ''}); choose another folder, or move them away "
                           "yourself")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, own_files: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on success its files are flushed and it replaces
    ``path``, on error it is removed. At every instant a complete folder exists, at ``path`` or moved aside
    (``recover_folder`` puts it back). Refuses (NotOurFolder) to replace a folder the suite did not write."""
    path = recover_folder(path)
    check_ours(path, own_files)
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted write
    staging.mkdir(parents=True)
    try:
        yield staging
        (staging / MARKER).write_text("written by the efficientllm attention-free benchmark\n")
        for file in staging.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)  # a crash before this line leaves the previous folder at ``old``
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
