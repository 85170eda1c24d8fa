"""Test-wide settings."""
import os

import torch

# The suite runs many tiny models: one intra-op thread avoids OpenMP spin-waiting against the
# other processes of a shared 2-core machine (it was up to 80x slower with 2 threads).
torch.set_num_threads(1)
os.environ.setdefault("VLKIT_NO_PROGRESS", "1")
