"""scikit-learn's handwritten digits as a tiny image dataset: 1,797 grayscale 8x8 images upsampled to 16x16 in [-1, 1].

The data ships with scikit-learn (no download), which the `demo` extra installs.
"""

import torch
import torch.nn.functional as F

RESOLUTION = 16  # Side of the demo's images; the digits are 8x8, upsampled bilinearly.
NUM_CLASSES = 10
PIXEL_MAX = 16.0  # The digits' pixel values are integers 0..16 (ink = 16).


class DigitsUnavailableError(RuntimeError):
    """scikit-learn is missing, so the digits cannot be loaded."""


def load_digits(resolution=RESOLUTION):
    """Return the digits as float32 images (1797, 1, R, R) in [-1, 1] (background -1) and int64 labels (1797,)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise DigitsUnavailableError("the demo needs scikit-learn: pip install 'dmd-distill[demo]'") from e
    digits = sklearn_load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / PIXEL_MAX  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)  # stays in [0, 1]
    return x * 2 - 1, torch.as_tensor(digits.target, dtype=torch.long)
