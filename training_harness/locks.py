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
def exclusive(folder: Path, what: str, beside: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; raise FolderInUse, naming the holder's PID and host, if
    another process holds it. ``what`` names the folder in the message (a run folder). The lock file lies in
    the folder, or ``beside`` it for a folder that is replaced by renaming (prepared data)."""
    (folder.parent if beside else folder).mkdir(parents=True, exist_ok=True)
    path = folder.with_name(f".{folder.name}.lock") if beside else folder / LOCK_FILE
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
            if beside:  # leave nothing beside the user's folder (a process opening it just now is refused anyway)
                path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
