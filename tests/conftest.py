"""Shared test fixtures: the EDM reference files and small deterministic settings."""

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
