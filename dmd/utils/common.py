"""Small helpers shared by the commands: seed ranges, one-hot labels, devices, EDM's image quantisation, grids."""

import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw


def parse_int_list(s):
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11] (a list passes through)."""
    if isinstance(s, (list, tuple)):
        return [int(v) for v in s]
    out = []
    for part in str(s).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"range '{part}' ends before it starts")
            out.extend(range(lo, hi + 1))
        elif re.fullmatch(r"\d+", part):
            out.append(int(part))
        else:
            raise ValueError(f"cannot parse '{part}' as an integer or a range like 0-63")
    return out


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
