"""A training step's forward and backward passes captured once as a CUDA graph and replayed.

Where the host cannot launch a step's kernels as fast as the GPU runs them (Mamba-2 at 3B and micro-batch 1
launches ~11,000 per step, most from Python), the GPU waits between kernels. A replay launches the whole step
at once. PyTorch's whole-network capture (torch.cuda.graphs): warm-up on a side stream, gradients dropped so
that the capture allocates them from the graph's memory pool, then one capture of the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) of one micro-batch, on the device

#: Side-stream iterations before the capture, as torch.cuda.make_graphed_callables does by default.
WARMUP_ITERATIONS = 3


class GraphedStep:
    """``forward_backward(batches) -> summed loss``, captured on copies of ``example`` and replayed by ``run``.

    ``drop_gradients`` sets every gradient (and working weights' float32 sums) to None before the capture.
    Gradients accumulate into the tensors that the capture created; each replay overwrites them, so between
    steps they are neither zeroed nor set to None (the optimizer reads them, then the next replay writes them
    again). The model must not change its parameters' identity, or the storage its forward reads, afterwards."""

    def __init__(self, forward_backward: Callable[[list[Batch]], torch.Tensor], example: list[Batch],
                 drop_gradients: Callable[[], None]):
        self.inputs = [(inputs.clone(), labels.clone()) for inputs, labels in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy per-stream state (library handles, autograd) before the capture
            for _ in range(WARMUP_ITERATIONS):
                forward_backward(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        drop_gradients()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph's pool replaces the blocks cached by the steps before it
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss_sum = forward_backward(self.inputs)

    def run(self, batches: list[Batch]) -> torch.Tensor:
        """One step on ``batches`` (shaped like the example): the summed loss, the gradients in ``.grad``."""
        for (inputs, labels), (static_inputs, static_labels) in zip(batches, self.inputs, strict=True):
            static_inputs.copy_(inputs)
            static_labels.copy_(labels)
        self.graph.replay()
        return self.loss_sum.clone()  # the graph's own output is overwritten by the next replay
