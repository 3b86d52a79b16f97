"""Shared test settings: W&B never reaches the network from tests (a test that checks offline mode sets it)."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
