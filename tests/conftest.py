"""Shared test fixtures: the EDM reference files, small deterministic settings, the training tests' data (a pair
file and real images for the fixture teacher), and pickles written as EDM2's and hostile files are (the loader tests
of networks and of FID references)."""

import os
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def fixtures_dir():
    return FIXTURES


# The tiny test networks run ~10x slower with two threads fighting over two shared cores; one thread each keeps the
# suite fast, and subprocesses the tests start inherit OMP_NUM_THREADS.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


# Pickles as a call of `func(*args)`, the way a malicious pickle smuggles code in; a `state` is then set on the result.
class Call:
    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def pickled_array(shape, dtype, data, made=None):
    """A numpy array as numpy pickles it: _reconstruct(ndarray, (0,), b'b'), then BUILD (version, shape, dtype, C
    order, data); `made` replaces _reconstruct's arguments."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    made = (np.ndarray, (0,), b"b") if made is None else made
    return Call(_reconstruct, *made, state=(1, shape, np.dtype(dtype), False, data))


def numpy1_spelling(data):
    """A protocol-4 pickle of numpy arrays written by numpy 2 (`numpy._core.multiarray._reconstruct`, named once) as
    numpy 1.x writes it (`numpy.core.multiarray`, as in EDM2's released files), the frame around the name resized."""
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"  # SHORT_BINUNICODE, its length
    at = data.index(old)
    assert data.count(old) == 1
    frame = max(pos for op, _, pos in pickletools.genops(data) if op.name == "FRAME" and pos < at)
    size = struct.unpack("<Q", data[frame + 1 : frame + 9])[0] + len(new) - len(old)
    return data[: frame + 1] + struct.pack("<Q", size) + data[frame + 9 : at] + new + data[at + len(old) :]


def write_pairs(path, n, resolution=8):
    """A pair file of n random pairs for the tiny conditional teacher."""
    from dmd.data import PairWriter, create_pair_file

    g = torch.Generator().manual_seed(n)
    latents = torch.randn(n, 3, resolution, resolution, generator=g)
    images = torch.rand(latents.shape, generator=g) * 2 - 1
    labels = torch.randint(10, (n,), generator=g)
    create_pair_file(path, channels=3, resolution=resolution, label_dim=10, seeds=list(range(n)), attrs={})
    with PairWriter(path) as writer:
        writer.append(latents.numpy(), images.numpy(), labels.numpy())
    return path


@pytest.fixture
def pairs(tmp_path):
    return write_pairs(tmp_path / "pairs.h5", 6)


@pytest.fixture
def real(tmp_path):
    """16 real 8x8 RGB images with labels in EDM's dataset format (a zip), for the fixture teacher."""
    from dmd.images import write_image_dataset

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (16, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    write_image_dataset(tmp_path / "real.zip", images, labels=torch.arange(16) % 10)
    return tmp_path / "real.zip"


def save_tiny_vae(folder, latent_channels=4):
    """A tiny randomly initialised diffusers AutoencoderKL saved with save_pretrained (2x per side: 8x8 latents are
    16x16 pixels), a stand-in for EDM2's Stable Diffusion VAE, which tests cannot download."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    )
    vae.save_pretrained(folder)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def save_tiny_dinov2(path, image_size=518):
    """A random 1-layer, 32-wide Dinov2Model saved with save_pretrained at `path`, with position embeddings of
    (image_size / 14)^2 patches: 37x37 by default, ViT-L/14's, which 224x224 inputs resample to 16x16."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=image_size, initializer_range=0.2,  # 10x the default: features that vary with the image
    )  # fmt: skip
    torch.manual_seed(3)
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny")
