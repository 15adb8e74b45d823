"""CUDA-graph capture of a function of fixed-shape tensors (one graph per input signature)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class _Captured:
    """One signature's graph, its static buffers, and the event after its last replay's clones."""

    graph: torch.cuda.CUDAGraph
    static_args: list[Any]
    static_out: Any
    last_use: torch.cuda.Event | None = None


class CudaGraphRunner:
    """Call `fn(*args)` through captured CUDA graphs.

    The first call with a new signature (tensor shapes/dtypes/devices and the non-tensor arguments) warms `fn` up on a
    side stream, then captures it; every call copies the inputs into the graph's static buffers and replays it. `fn`
    must be capturable: no host syncs, no host-to-device copies, no data-dependent shapes, and it must return a tensor
    or a tuple of tensors. Outputs are cloned, so they stay valid after the next replay. Gradients are not supported
    (call it under torch.no_grad()).

    The static buffers are shared by every caller: a lock serialises host threads, and each call's stream waits for
    the previous call's replay and clones (an event), so a call from another stream cannot overwrite the inputs of a
    replay still in flight.
    """

    def __init__(self, fn: Callable[..., Any], warmup_iters: int = 2):
        self.fn = fn
        self.warmup_iters = warmup_iters
        self._graphs: dict[tuple, _Captured] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _signature(args: tuple) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, Tensor) else a for a in args)

    def __call__(self, *args: Any) -> Any:
        key = self._signature(args)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(args)
                self._graphs[key] = entry
            stream = torch.cuda.current_stream()
            if entry.last_use is not None:  # the previous replay (maybe on another stream) has read its inputs
                stream.wait_event(entry.last_use)
            for static, arg in zip(entry.static_args, args):
                if isinstance(arg, Tensor):
                    static.copy_(arg)
            entry.graph.replay()
            out = entry.static_out
            outs = out.clone() if isinstance(out, Tensor) else tuple(o.clone() for o in out)
            entry.last_use = torch.cuda.Event()
            entry.last_use.record(stream)
            return outs

    def _capture(self, args: tuple) -> _Captured:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not tensors or any(t.device.type != "cuda" for t in tensors):
            raise ValueError("CUDA-graph capture needs all tensor arguments on a CUDA device")
        static_args = [a.clone() if isinstance(a, Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):  # lets cuDNN/cuBLAS pick algorithms and allocate outside the capture
                self.fn(*static_args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: in the trainer, DataLoader pin-memory, DALI and NCCL threads keep making CUDA calls while this
        # thread captures; the default ("global") mode would make those calls fail the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(*static_args)
        return _Captured(graph, static_args, static_out)
