"""The draws and batches of a training step, the same on every rank and after a resume.

Every random draw of step s is a function of (seed, s, stream name) alone: the global batch's noise and labels are
drawn from a generator seeded by the step, and each rank takes its rows, so K processes reproduce one process at the
same global batch. Dataset batches (teacher pairs, real images) follow a DistributedSampler's per-epoch shuffle of
the run seed; the union of the ranks' batches of a step is the same block of the epoch's permutation for any number
of processes, and the position (epoch, batch index) is saved, so a resumed run reads what an uninterrupted one reads.
"""

import hashlib

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from dmd.utils import distributed as dist
from dmd.utils.common import one_hot


def step_seed(seed, step, stream):
    """A 63-bit seed from (run seed, step, stream name)."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed, step, stream, device="cpu"):
    """A generator for one stream of one step: the same draws on every rank and after a resume."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, stream))


def draw_generator_inputs(net, seed, step, stream, n, device):
    """Draw the global batch's z (n, C, H, W) and one-hot labels (n, label_dim) or None, uniform over classes, on
    `device` (its generator type fixes the numbers: CPU and CUDA runs differ, K processes equal one)."""
    g = step_generator(seed, step, stream, device)
    z = torch.randn((n, net.img_channels, net.img_resolution, net.img_resolution), generator=g, device=device)
    labels = torch.randint(net.label_dim, (n,), generator=g, device=device) if net.label_dim > 0 else None
    return z, one_hot(labels, net.label_dim, device=device)


def draw_noise(seed, step, stream, shape, rows, device):
    """Standard normal noise of a global batch `shape` (n, ...) drawn from the step's stream; this rank's `rows`."""
    g = step_generator(seed, step, stream, device)
    return torch.randn(shape, generator=g, device=device)[rows]


def draw_index(seed, step, stream, high):
    """An integer uniform in [0, high), the same on every rank (e.g. the generator level of a step)."""
    return int(torch.randint(high, (1,), generator=step_generator(seed, step, stream)))


def rank_rows(batch_size):
    """This rank's rows of the global batch."""
    rank = dist.get_rank()
    return slice(rank * batch_size, (rank + 1) * batch_size)


def take(c, rows):
    """Rows of optional class labels."""
    return None if c is None else c[rows]


def spread(x, rows, n):
    """Place this rank's rows x (B, ...) at `rows` of a zero global batch (n, ...), keeping x's gradient."""
    return torch.cat([x.new_zeros((rows.start, *x.shape[1:])), x, x.new_zeros((n - rows.stop, *x.shape[1:]))])


# A denoiser evaluated on this rank's rows of a global batch, zeros elsewhere. The losses draw their noise for the
# whole global batch from a generator seeded by the step, so every rank (and a single process) sees the same draws
# for the same sample, while each rank runs the network on its own rows only.
class RankRows:
    def __init__(
        self,
        net,  # denoiser net(x, sigma, class_labels), possibly DDP-wrapped
        rows,  # slice of the global batch this rank owns
    ):
        self.net, self.rows = net, rows

    def __call__(self, x, sigma, class_labels=None):
        out = self.net(x[self.rows], sigma[self.rows], take(class_labels, self.rows))
        return spread(out.to(x.dtype), self.rows, x.shape[0])

    def forward_with_bottleneck(self, x, sigma, class_labels=None):
        """The net's (D, bottleneck features) on these rows, each spread (Preconditioner.forward_with_bottleneck)."""
        out, h = self.net.forward_with_bottleneck(x[self.rows], sigma[self.rows], take(class_labels, self.rows))
        return spread(out.to(x.dtype), self.rows, x.shape[0]), spread(h, self.rows, x.shape[0])


# An item a DataLoader worker could not read, sent back as a value: torch re-raises a worker's exception with the
# worker's whole traceback inside its message, so the user's one-line error (a NaN row, a bad image) would arrive as
# 23 lines; this way the main process raises the same error class with the same line.
class _Unreadable:
    def __init__(self, error):
        self.kind, self.message = type(error), str(error)


class _Guarded(Dataset):
    """`dataset` whose items fail with one of `errors` as _Unreadable values instead of exceptions."""

    def __init__(self, dataset, errors):
        self.dataset, self.errors = dataset, errors

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except self.errors as e:
            return _Unreadable(e)


def _collate(items):
    """default_collate, or the first _Unreadable item of the batch."""
    return next((item for item in items if isinstance(item, _Unreadable)), None) or default_collate(items)


# Batches of a dataset (pairs, real images) in the order of a DistributedSampler, shuffled per epoch from the run
# seed, resumable at any batch. Items are tuples of tensors; a batch comes back as the same tuple, batched.
class BatchStream:
    def __init__(
        self,
        dataset,  # torch Dataset of tuples, e.g. PairDataset (z, y, label) or ImageDataset (image, label)
        batch_size,  # items per rank and step
        seed,  # shuffling seed; the permutation of epoch e is a function of (seed, e)
        workers=0,  # DataLoader worker processes
        pin_memory=False,  # page-locked batches, so the copy to a GPU overlaps compute
        errors=(),  # the dataset's own error classes: raised by next() as the dataset raised them, in one line
    ):
        self.dataset, self.batch_size, self.workers, self.pin_memory = dataset, batch_size, workers, pin_memory
        self.errors = tuple(errors)
        self.sampler = DistributedSampler(
            dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True, seed=seed, drop_last=True
        )
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.epoch, self.index, self._batches = 0, 0, None

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, position):
        self.epoch, self.index, self._batches = int(position["epoch"]), int(position["index"]), None

    def next(self, device):
        """Return the next batch as a tuple of tensors (B, ...) on `device`."""
        if self._batches is None:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            starts = range(self.index * self.batch_size, self.steps_per_epoch * self.batch_size, self.batch_size)
            batches = [order[i : i + self.batch_size] for i in starts]
            loader = DataLoader(
                _Guarded(self.dataset, self.errors),
                batch_sampler=batches,
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                collate_fn=_collate,
            )
            self._batches = iter(loader)
        batch = next(self._batches)
        if isinstance(batch, _Unreadable):
            raise batch.kind(batch.message)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        return tuple(t.to(device, non_blocking=True) for t in batch)
