"""The bookkeeping of a training loop, shared by DMD and the demo's teacher: EMA, clipping and skipping bad steps on
the device, statistics summed on the device and read at logging steps, skipped-step counters, stop signals.

Nothing here reads a device value on the host except where a docstring says so, so a GPU step is not stalled.
"""

import resource
import signal
import threading
import time

import torch

from dmd.utils import distributed as dist


def update_ema(G_ema, G, beta):
    """G_ema <- beta G_ema + (1 - beta) G, parameters and buffers."""
    with torch.no_grad():
        for p_ema, p in zip(G_ema.parameters(), G.parameters()):
            p_ema.lerp_(p, 1 - beta)
        for b_ema, b in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b)


def clip_and_step(opt, params, max_norm, loss):
    """Clip the gradients and step, unless the loss or the gradient norm is non-finite on any rank; then zero the
    gradients. Return (grad norm, 1.0 if the step was skipped else 0.0) as device tensors.

    No host sync: the fused AdamW skips its whole update (moments, step count, weight decay) on the device when its
    `found_inf` is non-zero, the mechanism torch's GradScaler uses.
    """
    norm = dist.gather_shard(torch.nn.utils.clip_grad_norm_(params, max_norm))  # --fsdp: a DTensor, the same on all
    bad = dist.all_reduce_max((~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float())  # 0-d
    opt.found_inf = bad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, bad


def memory_gib(device):
    """Peak memory: CUDA allocations on GPU; on CPU the process's peak resident set (VmHWM: ru_maxrss would also
    count what the parent held when it forked this process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB -> GiB
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def average_gradients(module):
    """Average the gradients of a module that no DDP wrapper reduces (DMD2's GAN head) over ranks; no-op alone and
    for a module FSDP shards, which reduces its own."""
    if dist.is_initialized():
        for p in module.parameters():
            if p.grad is not None and not dist.is_shard(p.grad):
                dist.all_reduce_mean(p.grad)


# SIGINT / SIGTERM only raise a flag; the loop sees it between steps (on every rank at once) and writes a checkpoint.
STOP_CHECK_STEPS = 10  # Under torchrun the ranks agree on a stop every this many steps (and at logging steps).


class StopSignals:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device):
        self.device, self.flag, self.previous = device, False, {}

    def _handle(self, signum, frame):
        self.flag = True
        signal.signal(signum, self.previous[signum])  # A second signal acts at once.

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, agree=True):
        """Whether to stop now. One process: whether it got a signal. Under torchrun, every rank must stop at the
        same step, so the ranks agree (an all-reduce) only at steps where `agree` is true, and say no otherwise."""
        if not dist.is_initialized():
            return self.flag
        return agree and bool(dist.all_reduce_mean(torch.tensor(float(self.flag), device=self.device)) > 0)


# Means of the per-step statistics since the last logging step, summed on the device, read at logging steps.
class Window:
    def __init__(self, device, names):
        self.device, self.names = device, names
        self.sum, self.steps, self.start = None, 0, time.perf_counter()

    def add(self, values):
        """Add one step's values on this rank (scalar tensors in the order of `names`)."""
        step = torch.stack([v.detach().to(torch.float64) for v in values])
        self.sum = step if self.sum is None else self.sum + step
        self.steps += 1

    def flush(self, images_per_step):
        """Return the window's means over steps and ranks with the throughput, and start a new window."""
        means = dist.all_reduce_mean(self.sum).cpu() / self.steps
        stats = {k: float(v) for k, v in zip(self.names, means)}
        stats["img_per_s"] = images_per_step * self.steps / (time.perf_counter() - self.start)
        self.__init__(self.device, self.names)
        return stats


# Skipped (non-finite) steps: the streak and the total, counted on the device; the same on every rank.
class BadSteps:
    def __init__(self, device, total=0):
        self.streak = torch.zeros((), device=device)
        self.total = torch.tensor(float(total), device=device)

    def add(self, bad):
        """Count one step; `bad` (0-d) is 1.0 if any of its optimiser steps was skipped."""
        self.streak = (self.streak + 1) * bad
        self.total = self.total + bad

    def read(self):
        """(steps in a row skipped up to now, skipped steps in all) as ints: a host sync."""
        streak, total = torch.stack([self.streak, self.total]).tolist()
        return int(streak), int(total)
