"""The processes a test started, found by the folder their command lines name: to stop them, or, past a
deadline, to learn where they wait."""

import os
import signal
from pathlib import Path


def processes_naming(folder: Path) -> list[int]:
    """The processes whose command line names ``folder``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            pass  # gone meanwhile
    return pids


def abort_with_stacks(folder: Path) -> str:
    """For a test past its deadline: where the processes whose command line names ``folder`` wait (pid, parent,
    state, the kernel function each sleeps in, command), each then sent SIGABRT, on which a Python started with
    PYTHONFAULTHANDLER=1 prints every thread's stack to its stderr before it ends."""
    rows = []
    for pid in processes_naming(folder):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state, parent = stat[stat.rindex(")") + 2:].split()[:2]
            waits_in = Path(f"/proc/{pid}/wchan").read_text() or "-"
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            os.kill(pid, signal.SIGABRT)
        except OSError:
            continue  # gone meanwhile
        rows.append(f"{pid} parent {parent} state {state} waits in {waits_in}: {command[:300]}")
    return "\n".join(rows) or "no process left"
