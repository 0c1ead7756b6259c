"""Small helpers shared by the commands: seed ranges, one-hot labels, devices, EDM's image quantisation, grids."""

import itertools
import json
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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


def parse_json(text, where):
    """json.loads(text), or ValueError "<where>: not readable JSON (...)" in one line for anything a file can hold:
    bad syntax or UTF-8, integers of more digits than Python converts, or nesting deeper than the parser recurses."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:200]
        raise ValueError(f"{where}: not readable JSON ({reason})") from None


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


# Grid text: PIL's default font at a size readable beside 64-px cells, in bands of GRID_LINE px (a 14-px line is 18 px
# from ascent to descent). Old Pillow (< 10.1, or no FreeType) has only its ~11-px bitmap font, which fits the bands.
GRID_FONT_SIZE = 14
GRID_LINE = 24


def _grid_font():
    try:
        return ImageFont.load_default(size=GRID_FONT_SIZE)
    except (TypeError, ImportError):  # Pillow < 10.1 takes no size; without FreeType a sized font cannot be built
        return ImageFont.load_default()


def _ink(font, text):
    """(left, top, right, bottom) of `text`'s ink when drawn at (0, 0); Pillow < 9.2's bitmap font has only getsize."""
    return font.getbbox(text) if hasattr(font, "getbbox") else (0, 0, *font.getsize(text))


def _class_bands(class_ids, n, nrow):
    """{row: texts} naming the class of each cell: above the first row, and above every row whose classes differ
    from the row above, so columns that share one class are labelled once, on top."""
    ids = torch.as_tensor(class_ids).long().flatten()
    ids = ids.expand(n) if ids.numel() == 1 else ids
    if ids.numel() != n:
        raise ValueError(f"class_ids has {ids.numel()} entries for {n} images")
    table = [ids[i : i + nrow].tolist() for i in range(0, n, nrow)]
    return {
        r: [f"class {k}" for k in row]
        for r, row in enumerate(table)
        if r == 0 or any(k != above for k, above in zip(row, table[r - 1]))
    }


def make_grid(images, nrow=None, row_labels=None, pad=2, *, col_labels=None, class_ids=None, title=None, cell=64):
    """Tile (N, C, H, W) images in [-1, 1] into an RGB PIL image, `nrow` per row, `pad` px apart.

    Each image is its EDM quantisation (to_uint8) upscaled by the smallest integer factor that makes it at least
    `cell` px a side (nearest: every pixel an s x s block; cell=1 keeps the native size). Text, all optional: a label
    per row on the left, a label per column on top, a title above all. `class_ids` (N,) (or one int for all) labels
    the cells with their classes instead of `col_labels`: a band above the first row and above each row whose
    classes differ from the row above, so a column of one class is labelled once. Grayscale is drawn as gray RGB.
    """
    if col_labels is not None and class_ids is not None:
        raise ValueError("make_grid takes col_labels or class_ids, not both")
    pixels = to_uint8(images)  # (N, H, W, C)
    n, h, w, c = pixels.shape
    if c not in (1, 3):
        raise ValueError(f"make_grid draws 1- or 3-channel images, not {c}")
    s = max(1, math.ceil(cell / min(h, w)))
    pixels = np.repeat(np.repeat(pixels, s, axis=1), s, axis=2)  # (N, sH, sW, C)
    h, w = h * s, w * s
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    bands = _class_bands(class_ids, n, nrow) if class_ids is not None else {}
    if col_labels is not None:
        bands = {0: [str(t) for t in col_labels]}

    font = _grid_font()
    margin = GRID_FONT_SIZE // 2
    row_labels = [str(t) for t in row_labels or []][:rows]
    label_w = max(_ink(font, t)[2] for t in row_labels) + 2 * margin if row_labels else 0
    title_h = GRID_LINE if title else 0
    tops, y = [], title_h + pad  # tops[r]: the y of row r's images, below its band if it has one
    for r in range(rows):
        y += GRID_LINE if r in bands else 0
        tops.append(y)
        y += h + pad
    width = label_w + nrow * (w + pad) + pad
    if title:
        width = max(width, _ink(font, title)[2] + 2 * margin)
    canvas = np.full((y, width, 3), 255, dtype=np.uint8)
    lefts = [label_w + pad + k * (w + pad) for k in range(nrow)]
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[tops[r] : tops[r] + h, lefts[k] : lefts[k] + w] = pixels[i]  # a gray channel broadcasts to RGB

    grid = Image.fromarray(canvas)
    draw = ImageDraw.Draw(grid)
    _, ink_top, _, ink_bottom = _ink(font, "Ag")  # one vertical extent for all text, so labels share a baseline

    def text(t, x0, x1, y0, y1, center=True):
        x = (x0 + x1 - _ink(font, t)[2]) // 2 if center else x0
        draw.text((x, (y0 + y1 - ink_top - ink_bottom) // 2), t, fill=(0, 0, 0), font=font)

    if title:
        text(title, 0, width, 0, GRID_LINE)
    for r, label in enumerate(row_labels):
        text(label, margin, label_w, tops[r], tops[r] + h, center=False)
    for r, texts in bands.items():
        for k, t in enumerate(texts[:nrow]):
            text(t, lefts[k], lefts[k] + w, tops[r] - GRID_LINE, tops[r])
    return grid


def display_samples(samples, nrow=None, class_ids=None, title=None):
    """Return a PIL grid of generated samples (N, C, H, W) in [-1, 1] for notebooks: cells at least 64 px, the
    classes `class_ids` (N,) labelled as make_grid does, and an optional title."""
    return make_grid(samples, nrow=nrow, class_ids=class_ids, title=title)
