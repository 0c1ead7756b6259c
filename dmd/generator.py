"""The one-step generator of DMD: G(z, c) = D_G(sigma_G * z; sigma_G, c), with sigma_G = 80 (EDM's sigma_max)."""

import torch

SIGMA_G = 80.0

# The files `train` writes and `DMDGenerator` reads: inference snapshots and full training states (torch.save dicts).
SNAPSHOT_FORMAT = "dmd-snapshot"
STATE_FORMAT = "dmd-training-state"
FORMAT_VERSION = 2  # 2: training states record the global batch and the teacher and pair fingerprints


def one_step(net, z, class_labels=None, sigma=SIGMA_G):
    """Map unscaled noise z ~ N(0, I) of shape (N, C, H, W) to images with one denoiser call at `sigma`."""
    sigma_t = torch.full((z.shape[0],), float(sigma), device=z.device)
    return net(z * sigma, sigma_t, class_labels)
