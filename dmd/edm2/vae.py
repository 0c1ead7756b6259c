"""The Stable Diffusion VAE of EDM2's latent teachers: diffusers' `AutoencoderKL`, as EDM2 itself loads it.

EDM2's latent networks (`edm2-img512-*`) run on the VAE's latents of 512x512 images, 4 channels at 64x64, scaled per
channel by the pickle's `StabilityVAEEncoder` attributes (`net.encoder_info`). `LatentCodec` holds the VAE with them:
`encode_raw` turns uint8 pixels into raw latents (the VAE's mean and std, 8 channels, as EDM2's encoded datasets hold
them), `final_latents` (dmd.edm2.encoders) draws the network's latents from those, and `decode` turns the network's
latents back into uint8 pixels. Pixels enter the VAE in [0, 1], not [-1, 1], as EDM2 feeds them.

The VAE comes from a folder saved with `save_pretrained` or from the Hugging Face Hub by name (EDM2's is
'stabilityai/sd-vae-ft-mse'), downloaded once into the package's cache folder (`<cache>/huggingface`). diffusers is
the optional extra `dmd[latent]`, imported only here.
"""

import os
from pathlib import Path

import torch

from dmd.edm2.encoders import EncoderInfo

LATENT_ENCODER = "StabilityVAEEncoder"  # the class name EDM2's latent pickles give their encoder
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]  # what a VAE needs from its Hub repository


class VAEError(ValueError):
    """A VAE that cannot be loaded or does not fit the teacher; the message names the flag."""


def latent_info(net):
    """The EncoderInfo of a network that runs on VAE latents (an EDM2 latent teacher or its students), else None."""
    info = getattr(net, "encoder_info", None)
    return info if info is not None and info.class_name == LATENT_ENCODER else None


def _vae_folder(source, cache_dir, flag):
    """The local folder of VAE `source`: a folder saved with save_pretrained, or a Hub name downloaded into the
    cache (HF_HUB_OFFLINE=1: only the cache is read)."""
    from dmd.utils.download import cache_dir as cache_folder

    folder = Path(os.fspath(source)).expanduser()
    if folder.is_dir():
        return folder
    text = os.fspath(source)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise VAEError(f"{flag} {text}: no such folder, and not a Hugging Face name like 'stabilityai/sd-vae-ft-mse'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise VAEError(f"{flag} {text}: downloading a VAE needs huggingface_hub (pip install dmd[hub])") from e
    try:
        return Path(
            snapshot_download(text, cache_dir=cache_folder(cache_dir) / "huggingface", allow_patterns=VAE_FILES)
        )
    except (OSError, ValueError) as e:  # HTTP, offline and cache errors are OSErrors, a malformed name a ValueError
        reason = " ".join(str(e).split())[:200]
        raise VAEError(
            f"{flag} {text}: cannot download the VAE ({reason}); without internet, save it with "
            f"AutoencoderKL.from_pretrained('{text}').save_pretrained(FOLDER) where it can and give {flag} FOLDER"
        ) from e


def load_vae(source, *, cache_dir=None, device="cpu", flag="--vae"):
    """diffusers' AutoencoderKL of `source` (a save_pretrained folder or a Hub name), in eval mode, frozen, float32,
    on `device`; VAEError naming `flag` if it does not load."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise VAEError(f"{flag}: a latent teacher needs diffusers' AutoencoderKL (pip install dmd[latent])") from e
    folder = _vae_folder(source, cache_dir, flag)
    try:
        vae = AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)  # no `accelerate` needed
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise VAEError(f"{flag} {source}: not a diffusers AutoencoderKL folder ({reason})") from e
    return vae.to(device).eval().requires_grad_(False)


# EDM2's StabilityVAEEncoder with its VAE loaded: pixels <-> the latents a latent network runs on.
class LatentCodec:
    def __init__(
        self,
        vae,  # diffusers AutoencoderKL (load_vae), frozen
        info: EncoderInfo,  # the teacher pickle's StabilityVAEEncoder attributes: scale, bias, batch_size
        dtype=torch.float32,  # the VAE's compute dtype on CUDA (the run's precision); the CPU computes in float32
    ):
        self.vae, self.info, self.dtype = vae, info, dtype
        self.batch_size = info.batch_size or 8  # images per VAE call, as the pickle's encoder says
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent a side (SD's VAE: 8)

    @property
    def device(self):
        return next(self.vae.parameters()).device

    def pixel_resolution(self, latent_resolution):
        """The image size a side of latents `latent_resolution` a side (64 -> 512 for SD's VAE)."""
        return latent_resolution * self.scale_factor

    def _autocast(self):
        device = self.device
        enabled = device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast(device.type, dtype=self.dtype, enabled=enabled)

    @torch.no_grad()
    def encode_raw(self, pixels):
        """Raw latents (N, 2C, h, w) float32, the VAE's mean then std, of uint8 images (N, 3, H, W) (any device)."""
        x = pixels.to(self.device, torch.float32) / 255  # the VAE reads [0, 1], as EDM2 feeds it
        out = []
        with self._autocast():
            for batch in x.split(self.batch_size):
                d = self.vae.encode(batch).latent_dist
                out.append(torch.cat([d.mean, d.std], dim=1).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents):
        """uint8 images (N, 3, H, W) of a latent network's latents (N, C, h, w): (x - bias) / scale through the VAE,
        clamped to [0, 1] and scaled by 255 with truncation, as EDM2 decodes."""
        x = latents.to(self.device, torch.float32)
        scale = torch.tensor(self.info.scale, device=x.device).reshape(1, -1, 1, 1)
        bias = torch.tensor(self.info.bias, device=x.device).reshape(1, -1, 1, 1)
        x = (x - bias) / scale
        out = []
        with self._autocast():
            for batch in x.split(self.batch_size):
                out.append(self.vae.decode(batch).sample.float().clamp(0, 1).mul(255).to(torch.uint8))
        return torch.cat(out)

    def decode_to_unit(self, latents):
        """Decoded images as float32 in [-1, 1] (uint8 / 127.5 - 1), the range every pixel path of dmd takes; exact
        for the uint8 values, so `to_uint8` gives the decoded pixels back."""
        return self.decode(latents).float() / 127.5 - 1


def load_codec(net, source=None, *, cache_dir=None, device="cpu", dtype=torch.float32, flag="--vae"):
    """The LatentCodec of a latent network (None for a pixel network): its VAE from `source`, by default the name
    its pickle gives (EDM2's 'stabilityai/sd-vae-ft-mse'); VAEError naming `flag` if the VAE does not load or its
    latent channels are not the network's."""
    info = latent_info(net)
    if info is None:
        if source is not None:
            raise VAEError(f"{flag} is for latent teachers; this network runs on pixels ({net.img_channels} channels)")
        return None
    source = info.vae_name if source is None else source
    vae = load_vae(source, cache_dir=cache_dir, device=device, flag=flag)
    channels = vae.config.latent_channels
    if channels != net.img_channels or channels != len(info.scale):
        raise VAEError(
            f"{flag} {source}: the VAE has {channels} latent channels but the network runs on {net.img_channels}"
        )
    return LatentCodec(vae, info, dtype)
