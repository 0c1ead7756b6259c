"""What the teacher families' preconditioners share beyond their authors' own interfaces (EDM's in
dmd/edm/precond.py, EDM2's in dmd/edm2/networks.py): how a call's inputs are prepared, and the shape of the
bottleneck that DMD2's discriminator reads. Each family names its U-Net as its authors do (EDM `model`, EDM2
`unet`); `backbone` is that U-Net under one name.
"""

import numpy as np
import torch


def plain_kwargs(kwargs):
    """A network's constructor kwargs in plain JSON types (numpy scalars -> numbers, tuples -> lists), as checkpoints
    store them and build_network reads them back; ValueError naming a kwarg of any other type."""

    def plain(value, name):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [plain(v, name) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v, name) for k, v in value.items()}
        raise ValueError(
            f"network kwarg '{name}' is a {type(value).__name__}; only numbers, strings and lists are allowed"
        )

    return {name: plain(value, name) for name, value in kwargs.items()}


class Denoiser(torch.nn.Module):
    @property
    def backbone(self):
        """The U-Net inside the preconditioner."""
        raise NotImplementedError

    def bottleneck_shape(self):
        """Return (C', H', W'), the shape of one sample's bottleneck features, from the architecture alone."""
        name, first = next(iter(self.backbone.dec.items()))  # '{r}x{r}_in0', the block that takes the bottleneck
        resolution = int(name.split("x")[0])
        return first.in_channels, resolution, resolution

    def _unet_inputs(self, x, sigma, class_labels, force_fp32):
        """Return x, sigma (N or 1, 1, 1, 1), the class labels and the compute dtype, prepared as `forward` does."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)  # a 0-d sigma broadcasts
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)  # one zero row, broadcast by the U-Net
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        return x, sigma, class_labels, self.model_dtype(x, force_fp32)
