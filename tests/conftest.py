"""Shared test fixtures: the EDM reference files, small deterministic settings, and the training tests' data (a
pair file and real images for the fixture teacher)."""

import os
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
