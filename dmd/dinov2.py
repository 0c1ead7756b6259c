"""The DINOv2 ViT-L/14 feature detector of EDM2's FD_DINOv2, with the call signature of the Inception detector.

EDM2 (calculate_metrics.py) loads `dinov2_vitl14` with torch.hub, which runs the facebookresearch/dinov2 repository's
code fetched at run time. We build the same network with transformers' `Dinov2Model` instead: the Hub's
`facebook/dinov2-large` holds the same weights, and no code comes from the network. Not timm's copy either: timm
needs torchvision, which has no CPU wheel for our torch on PyPI.

    detector(uint8 images (N, 3, H, W), return_features=True) -> (N, 1024) float32

The features are the CLS token after the final layernorm (the hub model's `x_norm_clstoken`, transformers'
`pooler_output`). Two details make them EDM2's rather than transformers' own:
  - the preprocessing is EDM2's, in its order: the uint8 values as floats (0..255) resized to 224x224 (bicubic,
    antialiased, align_corners=False), then divided by 255, then normalised with ImageNet's mean and std;
  - the 37x37 position embeddings (trained at 518x518) are resampled to the 16x16 patches of a 224x224 image as the
    hub model does it, bicubic with scale factor (16 + 0.1) / 37 (its interpolate_offset), where transformers
    resamples to size 16 (scale 16 / 37): a slightly different grid, so slightly different features. We resample
    once at load, and transformers then uses the embeddings as they are.
"""

import json
import re
from pathlib import Path

import torch

from dmd.fid import FIDError

DINOV2_MODEL = "facebook/dinov2-large"  # The weights of torch.hub's dinov2_vitl14 (EDM2's), on the Hugging Face Hub.
RESOLUTION = 224  # EDM2 resizes every image to this before DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POS_OFFSET = 0.1  # The hub model's interpolate_offset: scale factor (n + 0.1) / M for n x n patches from M x M.
FILES = ("config.json", "model.safetensors")  # What save_pretrained writes, and all we download.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_INSTALL = "pip install 'dmd-distill[dinov2]'"


# DINOv2 as a feature detector: EDM2's preprocessing of uint8 images, then the CLS token after the final layernorm.
class DINOv2Detector(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model  # transformers' Dinov2Model, position embeddings already resampled for 224x224 inputs
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def preprocess(self, x):
        """uint8 (N, 3, H, W) -> float32 (N, 3, 224, 224), normalised as EDM2 normalises DINOv2's inputs."""
        size = (RESOLUTION, RESOLUTION)
        x = torch.nn.functional.interpolate(x.float(), size, mode="bicubic", antialias=True, align_corners=False)
        return (x / 255 - self.mean) / self.std

    def forward(self, x, return_features=True):  # return_features: the Inception detector's signature
        return self.model(pixel_values=self.preprocess(x)).pooler_output  # (N, D)


def _transformers(flag):
    try:
        import transformers
    except ImportError:
        raise FIDError(f"{flag}: FD_DINOv2 needs transformers: {_INSTALL}") from None
    return transformers


def _one_line(error):
    return " ".join(str(error).split())[:200] or type(error).__name__


def _download(name, cache_dir, flag):
    """The local folder of Hub model `name` (config.json and model.safetensors), fetched into dmd's cache once."""
    from dmd.utils.download import cache_dir as dmd_cache_dir

    try:
        import huggingface_hub

        folder = huggingface_hub.snapshot_download(
            name, cache_dir=dmd_cache_dir(cache_dir) / "huggingface", allow_patterns=list(FILES)
        )
    except ImportError:
        raise FIDError(f"{flag}: downloading {name} needs huggingface_hub: {_INSTALL}") from None
    except (OSError, ValueError) as e:  # HTTP, offline and cache errors are OSErrors, a malformed name a ValueError
        raise FIDError(
            f"{flag} {name}: no such folder, and the Hugging Face Hub download failed ({_one_line(e)}); without "
            f"internet, run Dinov2Model.from_pretrained('{name}').save_pretrained(DIR) where there is, copy DIR here "
            f"and give {flag} DIR"
        ) from e
    return Path(folder)


def _resample_positions(model):
    """Resample the M x M patch position embeddings to the n x n patches of a 224x224 image as the hub model does."""
    embeddings = model.embeddings
    pos = embeddings.position_embeddings.data  # (1, 1 + M * M, D): the CLS token's, then the patches' row by row
    M, D = round((pos.shape[1] - 1) ** 0.5), pos.shape[2]
    n = RESOLUTION // embeddings.patch_embeddings.patch_size[0]
    if M == n:  # the hub model uses them as they are
        return
    grid = pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (n + POS_OFFSET) / M
    grid = torch.nn.functional.interpolate(grid.float(), scale_factor=(scale, scale), mode="bicubic")  # (1, D, n, n)
    patches = grid.permute(0, 2, 3, 1).reshape(1, n * n, D).to(pos.dtype)
    embeddings.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], patches], 1), requires_grad=False)
    model.config.image_size = RESOLUTION


def _read(folder, where, flag):
    """Dinov2Model of a folder saved with save_pretrained, every weight from the file (none initialised at random)."""
    transformers = _transformers(flag)
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise FIDError(
            f"{where}: no readable config.json of a model saved with save_pretrained ({_one_line(e)})"
        ) from e
    if model_type != "dinov2":
        raise FIDError(f"{where}: config.json describes a '{str(model_type)[:40]}' model, not 'dinov2'")
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # our own error below replaces its load report
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = transformers.Dinov2Model.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise FIDError(f"{where}: not a readable DINOv2 model ({_one_line(e)})") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    wrong = {kind: sorted(map(str, keys)) for kind, keys in info.items() if kind != "error_msgs" and keys}
    if wrong:
        raise FIDError(f"{where}: the weights do not fit the config ({_one_line(wrong)})")
    return model


def load_dinov2(source=None, *, cache_dir=None, device="cpu", flag="--dinov2"):
    """The DINOv2 detector (eval mode, frozen) of a folder saved with `save_pretrained` or a Hugging Face Hub name
    (None: facebook/dinov2-large, EDM2's ViT-L/14), downloaded into dmd's cache once. FIDError lines name `flag`."""
    source = DINOV2_MODEL if source is None else str(source)
    _transformers(flag)  # say what to install before looking for the weights
    folder = Path(source).expanduser()
    if not folder.is_dir():
        if not _HUB_NAME.fullmatch(source):
            raise FIDError(
                f"{flag} {source}: no such folder; give a folder saved with save_pretrained or a Hugging Face Hub "
                f"name such as {DINOV2_MODEL}"
            )
        folder = _download(source, cache_dir, flag)
    model = _read(folder, f"{flag} {source}", flag)
    _resample_positions(model)
    return DINOv2Detector(model).to(device).eval().requires_grad_(False)
