"""Shared test fixtures: the EDM reference files and small deterministic settings."""

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
