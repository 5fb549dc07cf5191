"""Whole-step CUDA graphs: a training step (forward, loss, backward, clipping, optimiser) recorded once per batch
shape and then replayed with one launch.

An eager BMFN step on a GPU is bound by Python and kernel-launch cost, not by the GPU: a step is over a thousand
small kernels (benchmarks/train_step.py profiles one; bmfn-reference.md section 11 has its 122.5 GFLOP per 32 clips,
which an H100 does in well under a millisecond). Replaying a captured graph removes that cost and keeps the
arithmetic exactly the same.

The step function must only do tensor work on the device: no `.item()`, no Python branches on tensor values,
and every result must go into tensors that outlive the call (parameters, gradients, optimiser state, running
sums updated in place) or be returned, because a replay re-runs the recorded kernels on the same memory: a
returned tensor is the graph's own output, which the next replay overwrites. Evaluation uses the same class for
its forward passes (a step that returns the predicted labels).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch import Tensor

# Eager calls per batch shape before it is captured: cuBLAS and autograd create their workspaces and the
# optimiser its state in the first calls, and none of that may happen during a capture.
WARMUP_CALLS = 3

Step = Callable[[dict[str, Tensor]], Any]


class GraphedStep:
    """Calls `step(inputs)` and returns its result; with `enabled`, the first WARMUP_CALLS calls per input
    signature run eagerly (they are real steps) and the next one is captured as a CUDA graph that every later call
    replays after copying its inputs into the graph's own input tensors, returning the graph's outputs (valid until
    the next call). Without `enabled` (CPU, torchrun), every call is eager; so are all calls after a capture that
    fails (an operation some driver or library cannot capture), said once in `log`.

    With `share_memory`, the graphs of all input signatures share one memory pool, which holds the largest one's
    temporaries instead of each one's: for steps that keep nothing between calls but the result they return
    (evaluation, whose batch of 256 float32 clips needs ~3 GB). A training step keeps the gradients its graph
    wrote, which another graph's temporaries could then overwrite."""

    def __init__(self, step: Step, enabled: bool, log: Callable[[str], None] = print,
                 share_memory: bool = False) -> None:
        self.step, self.enabled, self.log = step, enabled, log
        self._calls: Counter = Counter()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Any]] = {}
        self._stream = torch.cuda.Stream() if enabled else None
        self._pool = torch.cuda.graph_pool_handle() if enabled and share_memory else None

    def __call__(self, inputs: dict[str, Tensor]) -> Any:
        if not self.enabled:
            return self.step(inputs)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        if key in self._graphs:
            graph, static, outputs = self._graphs[key]
            for name, tensor in inputs.items():
                static[name].copy_(tensor, non_blocking=True)
            graph.replay()
            return outputs
        self._calls[key] += 1
        # Warm-up and capture run on a side stream, as torch.cuda.graph asks, ordered after the inputs' producer.
        self._stream.wait_stream(torch.cuda.current_stream())
        if self._calls[key] <= WARMUP_CALLS:
            with torch.cuda.stream(self._stream):
                outputs = self.step(inputs)
            torch.cuda.current_stream().wait_stream(self._stream)
            return outputs
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        # The capture allocates the graph's own memory pool; the blocks the warm-up calls left cached would otherwise
        # stay reserved beside it (evaluation's batches of 256 clips: several GB twice over).
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                outputs = self.step(static)
        except RuntimeError as exc:  # nothing ran: a capture only records, so the step can still run eagerly
            self.enabled = False
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.log(f"warning: CUDA graph capture failed ({reason}); continuing without CUDA graphs")
            return self.step(inputs)
        self._graphs[key] = (graph, static, outputs)
        graph.replay()  # capturing records the step without running it
        return outputs
