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
    "The real-data fixtures committed in `tests/fixtures` (a byte-identical copy of `../shared/fixtures`)."
    path = ROOT / 'tests' / 'fixtures'
    assert path.is_dir(), f'{path} is missing: it is part of the repository'
    return path


DATASET_ABSENT = 'needs the ShanghaiTech datasets folder beside the checkout (../shared absent)'


@pytest.fixture(scope='session')
def shanghaitech_dir() -> Path:
    """The full ShanghaiTech dataset (`../shared/datasets/ShanghaiTech`, part B: 400 train and 316 test photos).

    Tests using it carry the `dataset` marker. Where the whole `../shared` folder is absent (a clone outside this
    workplace, such as the GitHub runner) they are skipped with `DATASET_ABSENT`, a reason `tests/skip_allowlist.txt`
    names; where `../shared` exists the data must be there, and a missing part fails the test."""
    if not SHARED.is_dir(): pytest.skip(DATASET_ABSENT)
    path = SHARED / 'datasets' / 'ShanghaiTech'
    assert (path / 'part_B' / 'test_data' / 'images').is_dir(), f'{path}/part_B is missing although {SHARED} exists'
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
