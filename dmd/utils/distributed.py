"""Distributed helpers that also work without torchrun (one process) and on CPU (gloo).

`torchrun --nproc_per_node K python -m dmd ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` reads them.
"""

import os

import torch
import torch.distributed as dist


def init(device_type="cpu"):
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise); a no-op for one process."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend=backend)


def setup_device(name="auto"):
    """Resolve `name` ('auto', 'cpu', 'cuda', 'cuda:N'), put each torchrun rank on its local GPU, join the group."""
    from dmd.utils.common import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    init(device.type)
    return device


def main_first(fn):
    """Return fn() called on rank 0 first and then on the other ranks, so a download fills the cache once."""
    if is_main():
        result = fn()
    barrier()
    if not is_main():
        result = fn()
    return result


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def backend():
    """The process group's backend ('gloo', 'nccl'), or None for one process."""
    return dist.get_backend() if is_initialized() else None


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main():
    return get_rank() == 0


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t):
    """Average a tensor over ranks in place and return it (identity for one process)."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def all_reduce_sum(t):
    """Sum a tensor over ranks in place and return it (identity for one process)."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t):
    """The elementwise maximum of a tensor over ranks, in place (identity for one process)."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src=0):
    """Send a picklable object from rank `src` to every rank (identity for one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_shard(t):
    """Whether `t` is an FSDP shard (a DTensor: one rank's part of a tensor split over the ranks)."""
    if not is_initialized():  # nothing is sharded without a process group
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def gather_shard(t):
    """The whole tensor of an FSDP shard: a collective, so every rank calls it; any other `t` as it is."""
    return t.full_tensor() if is_shard(t) else t


def shard_like(t, like):
    """A whole tensor `t` split over the ranks as the shard `like` is (each rank keeps its own part of its own copy
    of `t`, no communication); `t` itself where `like` is not a shard."""
    if not is_shard(like):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def module_class(net):
    """The class a network was built as: FSDP2's fully_shard makes a sharded module an instance of a subclass it
    names FSDP<class>, which no checkpoint reader knows."""
    if not is_initialized():  # nothing is sharded without a process group
        return type(net)
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(net).__mro__ if not issubclass(cls, FSDPModule))


def print0(*args, **kwargs):
    """Print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def shutdown():
    if is_initialized():
        dist.destroy_process_group()
