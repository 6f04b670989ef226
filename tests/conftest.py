"""Shared fixtures. Tests run on one CPU thread so that they stay lean beside other jobs."""

from __future__ import annotations

import os

import pytest
import torch

# One thread for this process and for any child process (the CLI tests start `python -m malex.cli`).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits, split with seed 0 (no download)."""
    from malex.data import load_digits

    return load_digits(0)


@pytest.fixture
def digits_model():
    """An untrained, seeded digits CNN (fast to build; enough for shape and plumbing checks)."""
    from malex.models import build_model

    torch.manual_seed(0)
    return build_model("digits_cnn", (1, 8, 8), 10)
