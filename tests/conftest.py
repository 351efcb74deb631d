"""Shared fixtures: threads pinned to one, paths to shared data."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PT10 = SHARED / "data" / "pt10_structrepgen"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request):
    return request.param


def random_rotation(rng, reflect=False):
    """A random orthogonal matrix (det -1 if ``reflect``)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return q
