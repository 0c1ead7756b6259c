"""Small helpers shared by the commands: seed ranges, one-hot labels, devices, EDM's image quantisation, grids."""

import itertools
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# At most this many values are expanded into a list at once: 200x the 50k images of the FID protocol, ~0.4 GB of
# Python ints. '0-4000000000' would need ~160 GB; such a range is refused, or kept as ranges by `int_ranges`.
MAX_INT_LIST = 10**7
_INT64 = range(-(2**63), 2**63)  # Seeds are stored (pair files) and batched (torch) as int64.


# A list of integers kept as ranges, so '0-4000000000' costs nothing until expanded: len, slices (new IntRanges),
# iteration, and numpy conversion (int64).
class IntRanges(Sequence):
    def __init__(self, ranges):
        self.ranges = [r for r in ranges if len(r)]
        self.length = sum(map(len, self.ranges))

    def __len__(self):
        return self.length

    def __iter__(self):
        return itertools.chain.from_iterable(self.ranges)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            if step != 1:
                raise ValueError("IntRanges slices take no step")
            parts, offset = [], 0
            for r in self.ranges:  # Keep the part of each range that falls inside [start, stop).
                parts.append(r[max(start - offset, 0) : max(stop - offset, 0)])
                offset += len(r)
            return IntRanges(parts)
        index = index + self.length if index < 0 else index
        for r in self.ranges:
            if 0 <= index < len(r):
                return r[index]
            index -= len(r)
        raise IndexError("IntRanges index out of range")

    def __array__(self, dtype=None, copy=None):
        parts = [np.arange(r.start, r.stop, dtype=np.int64) for r in self.ranges]
        out = np.concatenate(parts) if parts else np.empty(0, np.int64)
        return out if dtype is None else out.astype(dtype)


def int_ranges(s):
    """Parse '0-3,7,10-11' into IntRanges [range(0, 4), range(7, 8), range(10, 12)] without expanding it.

    A list or tuple of integers passes through; every value must fit in int64.
    """
    if isinstance(s, (list, tuple)):
        ranges = [range(int(v), int(v) + 1) for v in s]
    else:
        ranges = []
        for part in str(s).split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if m is None:
                raise ValueError(f"cannot parse '{part}' as an integer or a range like 0-63")
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo:
                raise ValueError(f"range '{part}' ends before it starts")
            ranges.append(range(lo, hi + 1))
    for value in (v for r in ranges for v in (r[0], r[-1])):
        if value not in _INT64:
            raise ValueError(f"{value} does not fit in 64 bits")
    return IntRanges(ranges)


def parse_int_list(s, limit=None):
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11] (a list passes through); keep the first `limit` if given.

    A result longer than MAX_INT_LIST is refused (ValueError) instead of exhausting memory.
    """
    values = int_ranges(s)[:limit]
    if len(values) > MAX_INT_LIST:
        raise ValueError(f"{len(values)} values, more than the {MAX_INT_LIST} one command takes; split the work")
    return list(values)


def one_hot(idx, label_dim, device=None):
    """Class indices (N,) -> float32 one-hot rows (N, label_dim); None when the network is unconditional."""
    if label_dim == 0:
        return None
    idx = torch.as_tensor(idx, dtype=torch.long, device=device)
    return torch.eye(label_dim, device=idx.device)[idx]


def resolve_device(name="auto"):
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_uint8(images):
    """EDM's PNG quantisation: (x * 127.5 + 128).clip(0, 255) truncated to uint8, NCHW float -> NHWC uint8 numpy."""
    x = (images.detach().float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images, nrow=None, row_labels=None, pad=2):
    """Tile (N, C, H, W) images in [-1, 1] into a PIL image, `nrow` per row, with optional text labels per row."""
    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    label_w = 0
    if row_labels:
        label_w = 7 * max(len(s) for s in row_labels) + 2 * pad
    canvas = np.full((rows * (h + pad) + pad, label_w + nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), label_w + pad + k * (w + pad)
        canvas[y0 : y0 + h, x0 : x0 + w] = pixels[i] if c == 3 else pixels[i][..., :1]
    grid = Image.fromarray(canvas)
    if row_labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((pad, pad + r * (h + pad) + max(0, h // 2 - 5)), text, fill=(0, 0, 0))
    return grid


def display_samples(samples, nrow=None):
    """Return a PIL grid of generated samples (N, C, H, W) in [-1, 1], for notebooks."""
    return make_grid(samples, nrow=nrow)
