"""Shared pytest fixtures: where the repository and the shared test data live."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope='session')
def fixtures_dir() -> Path:
    "The real-data fixtures beside the checkout (`../shared/fixtures`); skips the test when absent."
    path = SHARED / 'fixtures'
    if not path.is_dir(): pytest.skip(f'{path} is absent')
    return path


# Tests run in 2 xdist workers on 2 cores: one intra-op thread per worker avoids oversubscription
# (set before torch is imported by any test module or notebook).
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
try:
    import torch
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
except ImportError:  # the suite reports the missing dependency itself
    pass
