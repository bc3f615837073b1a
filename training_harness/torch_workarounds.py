"""Settings that work around faults of particular torch releases, each with the releases it was seen on.

A workaround applies up to the newest release it was seen on; on a later torch it is left out, and the
tests that exposed the fault (named beside each) say whether it is still needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workaround:
    name: str
    fault: str
    seen_on: tuple[str, ...]
    """torch releases (major.minor) where the fault was seen."""
    test: str
    apply: Callable[[], None]

    def needed(self, version: str = torch.__version__) -> bool:
        newest = max(tuple(int(part) for part in seen.split(".")) for seen in self.seen_on)
        return tuple(int(part) for part in version.split("+")[0].split(".")[:2]) <= newest


def _as_strided_outputs() -> None:
    torch._functorch.config.view_replay_for_aliased_outputs = False


def _no_autograd_cache() -> None:
    torch._functorch.config.enable_autograd_cache = False


COMPILE_WORKAROUNDS = (
    Workaround("view_replay", "outputs of a compiled region that are views of its intermediates (RWKV-7's per-head "
               "views), loaded from a warm compile cache, were rebuilt with garbage shapes by replaying the "
               "recorded views; as_strided rebuilds them from sizes and strides", ("2.13",),
               "tests/test_training.py::test_compiled_rwkv_regions_run_cold_and_from_a_warm_compile_cache",
               _as_strided_outputs),
    Workaround("autograd_cache", "saving a compiled backward to AOTAutograd's cache (first run, empty cache) "
               "intermittently crashed the process with SIGSEGV inside pickle.dumps (RWKV-7's regions on CPU; cold "
               "GPU runs died alike); without that cache each run traces again, and the compiled kernels still "
               "come from inductor's own cache", ("2.11", "2.13"),
               "tests/test_training.py::test_compiled_run_never_pickles_into_the_autograd_cache",
               _no_autograd_cache),
)


def apply_compile_workarounds() -> list[str]:
    """Apply the workarounds this torch needs before compiling; returns their names."""
    applied = [workaround for workaround in COMPILE_WORKAROUNDS if workaround.needed()]
    for workaround in applied:
        workaround.apply()
    return [workaround.name for workaround in applied]
