"""Shared pytest fixtures: where the repository and the shared test data live."""
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
