"""Graceful stop on SIGTERM / SIGINT: finish the step, write a checkpoint, exit; a second signal exits at once.

Schedulers preempt with SIGTERM (Slurm, Kubernetes; torchrun forwards it to every rank) and people press Ctrl-C. The
handler only records the signal; the training loop asks `agreed()` after every step, and the ranks agree through a
MAX all-reduce of one CPU integer over a gloo group, so every rank stops after the same step (no rank left waiting
in a collective) and no device synchronisation is added to the step.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from .distributed import DistInfo

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Installs the handlers (main thread only) and restores the previous ones on `restore()`."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.received: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}
        self._flag = torch.zeros(1, dtype=torch.int32)
        # A CPU group for the agreement: the default group may be NCCL, which would need a device tensor and a sync.
        # Over the training ranks only (tracker.placement=ranks: `info.group`); the tracking ranks do not call this,
        # so then only the members synchronise the group's creation.
        ranks = dist.get_process_group_ranks(info.group) if info.group is not None else None
        self._group = (dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=ranks is not None)
                       if info.world_size > 1 else None)
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # A forked decoder worker inherited the handler; Ctrl-C reaches the whole process group. The worker
            # keeps serving batches until the trainer closes its loader.
            return
        if self.received is not None:
            # The second signal: the user (or the scheduler) does not want to wait for the checkpoint.
            print(f"{signal.Signals(signum).name} again: exiting now without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"{signal.Signals(signum).name}: finishing the step, then writing a checkpoint and stopping "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self) -> str | None:
        """The name of the signal any rank received (the highest number if several), or None; a collective."""
        signum = self.received or 0
        if self._group is not None:
            # MAX over (no signal = 0); SIGTERM (15) wins over SIGINT (2), either way every rank gets the same answer
            self._flag[0] = signum
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
            signum = int(self._flag[0])
        return signal.Signals(signum).name if signum else None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


__all__ = ["StopSignal", "SIGNALS"]
