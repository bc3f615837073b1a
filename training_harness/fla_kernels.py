"""Fixed Triton configurations for flash-linear-attention's kernels, so that a run starts in seconds.

fla autotunes each kernel over hundreds of configurations the first time it runs on a machine
(minutes at 8K context). ``dump()`` records the configurations that autotuning chose, and
``import_fla_with_pinned_configs()`` imports fla with ``triton.autotune`` narrowed to those, so a
fresh machine only compiles the chosen kernels. Kernels without a pinned entry autotune as usual.
Each family that runs on fla keeps its own tables, one per GPU architecture (Hopper: sm90), in its
``kernel_configs/`` folder, since the best tiles depend on its head sizes; ``scripts/tune_fla_kernels.py``
regenerates them.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import sys
import warnings
from pathlib import Path

TABLES = "kernel_configs"  # the folder of a family's tables, inside its package


def config_file(family: str, compute_capability: tuple[int, int]) -> Path:
    """The family's table for one GPU architecture (it may not exist)."""
    package = Path(importlib.import_module(family).__file__).parent
    return package / TABLES / f"fla_sm{compute_capability[0]}{compute_capability[1]}.json"


def _kernel_id(fn) -> str:
    while hasattr(fn, "fn"):  # JITFunction / Heuristics wrappers down to the Python function
        fn = fn.fn
    return f"{fn.__module__}.{fn.__qualname__}"


@contextlib.contextmanager
def _pinned_autotune(table: dict[str, list[dict]]):
    """While active, ``@triton.autotune`` on a pinned kernel sees only its pinned configurations."""
    import triton

    original = triton.autotune

    def autotune(configs, key, **kwargs):
        def decorate(fn):
            pinned = table.get(_kernel_id(fn))
            if pinned:
                configs_used = [triton.Config(c["kwargs"], num_warps=c["num_warps"], num_stages=c["num_stages"],
                                              num_ctas=c.get("num_ctas", 1), maxnreg=c.get("maxnreg"))
                                for c in pinned]
            else:
                configs_used = configs
            return original(configs_used, key, **kwargs)(fn)

        return decorate

    triton.autotune = autotune
    try:
        yield
    finally:
        triton.autotune = original


def import_fla_with_pinned_configs(family: str, module: str) -> str:
    """Import ``module`` of fla, its kernels pinned by ``family``'s table for this GPU when there is one;
    returns how kernels were chosen. Pinning happens at fla's first import: one family's table per process."""
    import torch

    if "fla" in sys.modules:
        return "autotuned (fla was imported before pinning)"
    path = config_file(family, torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    if path is None or not path.exists():
        importlib.import_module(module)
        return "autotuned (no pinned table for this GPU)"
    table = json.loads(path.read_text())["kernels"]
    with _pinned_autotune(table):
        importlib.import_module(module)
    return f"pinned ({path.name})"


@functools.cache
def fla_kernel_choice(family: str, module: str) -> str | None:
    """``import_fla_with_pinned_configs`` once per process: how fla's kernels are chosen, or None without fla."""
    try:
        return import_fla_with_pinned_configs(family, module)
    except ImportError:
        return None


def _is_autotuner(obj, autotuner_type: type) -> bool:
    """isinstance() for any object gc holds, where a dead weak proxy raises."""
    try:
        return isinstance(obj, autotuner_type)
    except ReferenceError:
        return False


def dump(path: Path, extend: Path | None = None) -> int:
    """Write the configurations every fla autotuner chose in this process; returns the kernel count.
    ``extend`` names a table whose entries are kept for kernels not tuned here (a pinned kernel runs its one
    configuration without tuning, so it leaves nothing to record)."""
    import torch
    import triton
    from triton.runtime.autotuner import Autotuner

    kernels: dict[str, list[dict]] = json.loads(extend.read_text())["kernels"] if extend else {}
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes among gc's objects
        warnings.simplefilter("ignore", FutureWarning)
        tuners = [obj for obj in gc.get_objects() if _is_autotuner(obj, Autotuner)]
    for tuner in tuners:
        kernel = _kernel_id(tuner.base_fn)
        if not kernel.startswith("fla.") or not tuner.cache:
            continue
        chosen = {json.dumps(c.kwargs, sort_keys=True) + f"{c.num_warps}/{c.num_stages}": c
                  for c in tuner.cache.values()}
        kernels[kernel] = [{"kwargs": c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages,
                            "num_ctas": c.num_ctas, "maxnreg": c.maxnreg} for c in chosen.values()]
    document = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                "triton": triton.__version__, "kernels": dict(sorted(kernels.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return len(kernels)
