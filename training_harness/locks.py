"""One writer per folder: an OS file lock that names its holder, released when the process ends however it
ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from training_harness.errors import ConfigError

LOCK_FILE = ".efficientllm.lock"


class FolderInUse(ConfigError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock (made if missing) while the block runs; raise FolderInUse, naming the holder's
    PID and host, if another process holds it. ``what`` names the folder in the message (a run folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise FolderInUse(f"{folder} ({what}) is in use by {holder}; wait for it to finish or choose another "
                              "folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
