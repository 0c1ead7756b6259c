"""What EDM2's pickles say about the space a network runs in (EDM2's `training/encoders.py`), kept as data.

EDM2 pickles an `encoder` object beside every network: `StandardRGBEncoder` for pixel models (uint8 x maps to
x / 127.5 - 1, decoded as x * 127.5 + 128 clipped to [0, 255]) and `StabilityVAEEncoder` for latent models (the
Stable Diffusion VAE named `vae_name`; final latent = raw latent * scale + bias per channel, decoded as
(x - bias) / scale through the VAE). `dmd.edm.load_network` reads its attributes, never its code, into `EncoderInfo`
and keeps it as `net.encoder_info`. A latent network's real data are raw latents, the VAE's mean and std (EDM2's
encoded datasets, dmd/encoded.py), which `final_latents` turns into the latents the network sees.
"""

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

ENCODERS = ("StandardRGBEncoder", "StabilityVAEEncoder")  # EDM2's encoder classes, as named in its pickles


@dataclass(frozen=True)
class EncoderInfo:
    class_name: str  # One of ENCODERS.
    vae_name: Optional[str] = None  # StabilityVAEEncoder: the VAE, e.g. 'stabilityai/sd-vae-ft-mse'.
    scale: Optional[Tuple[float, ...]] = None  # StabilityVAEEncoder: per latent channel, float32 values.
    bias: Optional[Tuple[float, ...]] = None  # StabilityVAEEncoder: per latent channel, float32 values.
    batch_size: Optional[int] = None  # StabilityVAEEncoder: images per VAE call in EDM2.

    @classmethod
    def from_attributes(cls, class_name, attributes, channels):
        """Return the EncoderInfo of an EDM2 encoder pickled as `class_name` with these attributes (numpy arrays as
        arrays), for a network of `channels` channels; ValueError naming the first attribute that is not sane."""
        if class_name not in ENCODERS:
            raise ValueError(f"'encoder' is a {str(class_name)[:40]}, not one of EDM2's ({', '.join(ENCODERS)})")
        if class_name == "StandardRGBEncoder":  # no attributes
            return cls(class_name)

        def per_channel(name):
            array = attributes.get(name)
            if not (isinstance(array, np.ndarray) and array.shape == (channels,) and array.dtype.kind == "f"):
                raise ValueError(f"the encoder's '{name}' is not {channels} floats, one a latent channel")
            if not np.isfinite(array).all() or (name == "scale" and not array.all()):
                raise ValueError(f"the encoder's '{name}' holds a zero, an inf or a NaN")
            return tuple(array.astype(np.float32).tolist())

        vae_name, batch_size = attributes.get("vae_name"), attributes.get("batch_size")
        if not (isinstance(vae_name, str) and 0 < len(vae_name) <= 200):
            raise ValueError("the encoder's 'vae_name' is not the name of a VAE")
        if isinstance(batch_size, bool) or not (
            isinstance(batch_size, numbers.Integral) and 1 <= batch_size <= 1 << 20
        ):
            raise ValueError("the encoder's 'batch_size' is not a positive integer")
        return cls(class_name, vae_name, per_channel("scale"), per_channel("bias"), int(batch_size))

    def to_json(self):
        """The attributes as JSON values (snapshots, training states and exported folders record them)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items()}

    @classmethod
    def from_json(cls, data, channels):
        """The EncoderInfo that `to_json` recorded, for a network of `channels` channels, checked as a pickle's
        attributes are; ValueError naming what is not sane."""
        if not isinstance(data, dict):
            raise ValueError(f"the recorded encoder is a {type(data).__name__}, not a dict")
        arrays = {k: np.asarray(v, np.float32) for k, v in data.items() if k in ("scale", "bias") and v is not None}
        return cls.from_attributes(data.get("class_name"), {**data, **arrays}, channels)


def encoder_json(net):
    """The recorded form of a network's EncoderInfo (EDM2 networks), or None (EDM's networks have none)."""
    info = getattr(net, "encoder_info", None)
    return None if info is None else info.to_json()


def attach_encoder(net, data):
    """Set `net.encoder_info` from what `encoder_json` recorded (None: leave the network as built); ValueError if the
    record is not sane or the network cannot hold one."""
    if data is None:
        return net
    if not hasattr(net, "encoder_info"):
        raise ValueError(f"a {type(net).__name__} runs on pixels but the file records an encoder")
    net.encoder_info = EncoderInfo.from_json(data, net.img_channels)
    return net


def final_latents(raw, eps, info):
    """Final latents (N, C, h, w) = (mean + std * eps) * scale + bias per channel, from raw latents (N, 2C, h, w) =
    the VAE's mean then std, and standard normal eps (N, C, h, w): a fresh sample of the VAE's latent distribution each
    time a real latent is drawn, as EDM2's training loop draws it."""
    mean, std = raw.to(torch.float32).chunk(2, dim=1)
    scale = torch.tensor(info.scale, dtype=torch.float32, device=raw.device).view(1, -1, 1, 1)
    bias = torch.tensor(info.bias, dtype=torch.float32, device=raw.device).view(1, -1, 1, 1)
    return (mean + std * eps) * scale + bias
