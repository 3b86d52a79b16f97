"""Shared test settings: W&B never reaches the network from tests (a test that checks offline mode sets it)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's in-process runs, as its subprocesses have (OMP_NUM_THREADS=1), so that the
    bytes they write can be compared; the count is restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
