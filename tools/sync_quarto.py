"""Copy the top-level `_quarto.yml` (single source of truth) to `nbs/_quarto.yml`, which nbdev reads."""
import shutil
from pathlib import Path

root = Path(__file__).resolve().parents[1]
shutil.copyfile(root / '_quarto.yml', root / 'nbs' / '_quarto.yml')
print('nbs/_quarto.yml <- _quarto.yml')
