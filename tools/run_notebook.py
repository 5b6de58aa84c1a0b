"""Execute notebooks in place, as `jupyter nbconvert --execute --inplace` does, except cells flagged `#| slow`:
those are not run and keep the outputs they have (e.g. a long benchmark whose results file is committed).

Usage: `python tools/run_notebook.py nbs/NN_name.ipynb [...]`, then `nbdev_clean --fname FILE` and
`jupytext --sync FILE` as CONTRIBUTING.md describes.
"""
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def run_notebook(path: Path, timeout: int = 3600):
    "Execute `path` in its own folder; `#| slow` cells are skipped and keep their stored outputs."
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    slow = {i: (c.source, c.get('outputs', [])) for i, c in enumerate(nb.cells)
            if c.cell_type == 'code' and any(l.strip().replace(' ', '') == '#|slow' for l in c.source.splitlines())}
    for i in slow: nb.cells[i].source = '#| slow (not executed here)'
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}}).execute()
    for i, (src, outs) in slow.items(): nb.cells[i].source, nb.cells[i].outputs = src, outs
    nbformat.write(nb, path)


if __name__ == '__main__':
    for p in sys.argv[1:]:
        run_notebook(Path(p)); print(f'executed {p}')
