"""Run every notebook's test cells through nbdev's own test machinery (cells flagged `slow`/`notest` are skipped)."""
import configparser, os, warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'


def _skip_flags():
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    return cfg['DEFAULT']['tst_flags'].split()


def _notebooks():
    "Notebooks nbdev_test would run: not in folders holding a `.notest` file (the experiments), not hidden."
    out = []
    for nb in sorted(NBS.rglob('*.ipynb')):
        rel = nb.relative_to(NBS)
        if any(p.startswith(('.', '_')) for p in rel.parts): continue
        if any((NBS / Path(*rel.parts[:i]) / '.notest').exists() for i in range(len(rel.parts))): continue
        out.append(rel.as_posix())
    return out


@pytest.mark.parametrize('name', _notebooks())
def test_notebook(name):
    from nbdev.test import test_nb
    os.environ.setdefault('MPLBACKEND', 'Agg')
    with warnings.catch_warnings(record=True) as escaped:
        ok, secs = test_nb(NBS / name, skip_flags=_skip_flags(), force_flags=[], basepath=ROOT, showerr=True)
    # a warning class defined in a notebook lives in its `__main__`, which pytest-xdist cannot rebuild in the
    # controller (the worker dies): such warnings that escaped a test cell are raised again as UserWarning
    for w in escaped:
        local = w.category.__module__ == '__main__'
        warnings.warn(f"{name}: {w.category.__name__}: {w.message}", UserWarning if local else w.category)
    assert ok, f'{name}: a test cell failed (see the captured stderr above)'


def test_every_module_has_a_notebook():
    "Each generated module comes from a notebook that this suite runs (the experiments export nothing)."
    names = _notebooks()
    sources = set()
    for py in (ROOT / 'uotcrowd').glob('*.py'):
        head = py.read_text(encoding='utf-8')[:400]
        if 'File to edit: ../nbs/' in head:
            sources.add(head.split('File to edit: ../nbs/')[1].split('.ipynb')[0] + '.ipynb')
    assert sources, 'no generated modules found'
    assert sources <= set(names), f'modules exported from notebooks the suite does not test: {sources - set(names)}'
