"""Where a training step spends GPU time: kernel time and launches per step, and the kernels that take it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


def profile_steps(step: Callable[[], None], steps: int, top: int = 15) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler (CUDA); per step: kernel seconds, kernel launches, and
    the ``top`` kernels by their own GPU time. Kernel seconds far below a step's wall time (timed without the
    profiler) mean the host, not the GPU, sets the speed."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, float] = defaultdict(float)
    for event in kernels:
        by_name[event.name] += event.device_time / 1e6 / steps
    total = sum(by_name.values())
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {"gpu_kernel_s_per_step": total, "kernels_per_step": round(len(kernels) / steps),
            "top_kernels": [{"name": name[:120], "s_per_step": seconds, "share": seconds / total}
                            for name, seconds in ranked]}
