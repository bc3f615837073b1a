"""The tests' own process helpers: what a test past its deadline reports of the processes it started."""

import os
import re
import signal
import subprocess
import sys

from processes import abort_with_stacks


def test_a_process_past_a_tests_deadline_says_where_it_waits(tmp_path):
    folder = tmp_path / "run"
    waiting = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)",
                                str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert waiting.stdout.readline() == "ready\n"
    report = abort_with_stacks(folder)
    _, stderr = waiting.communicate(timeout=30)
    command = rf".*time\.sleep\(60\) {re.escape(str(folder))} "
    assert re.fullmatch(rf"{waiting.pid} parent {os.getpid()} state [RS] waits in \S+: {command}", report)
    assert waiting.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in stderr and 'File "<string>", line 1' in stderr
    assert abort_with_stacks(folder) == "no process left"
