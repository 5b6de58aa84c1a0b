"""Repository invariants: the library is exported from the notebooks, notebooks and their jupytext scripts agree,
the Quarto config has one source of truth, README and .ci/run agree on the test command."""
import filecmp, re, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'


def test_export_in_sync(tmp_path):
    "Running `nbdev_export` on a copy of the repo leaves `uotcrowd/` unchanged."
    work = tmp_path / 'repo'
    work.mkdir()
    shutil.copy(ROOT / 'settings.ini', work)
    shutil.copytree(NBS, work / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc'))
    shutil.copytree(ROOT / 'uotcrowd', work / 'uotcrowd', ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export.__wrapped__()'],
                   cwd=work, check=True, capture_output=True)
    before = sorted(p.relative_to(ROOT / 'uotcrowd').as_posix() for p in (ROOT / 'uotcrowd').rglob('*.py'))
    after = sorted(p.relative_to(work / 'uotcrowd').as_posix() for p in (work / 'uotcrowd').rglob('*.py'))
    assert before == after, f'nbdev_export creates or removes modules: {set(before) ^ set(after)}'
    stale = [f for f in before if not filecmp.cmp(ROOT / 'uotcrowd' / f, work / 'uotcrowd' / f, shallow=False)]
    assert not stale, f'uotcrowd/ is out of sync with nbs/ (run nbdev_export): {stale}'


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.source.strip()]


@pytest.mark.parametrize('ipynb', sorted(p.relative_to(NBS).as_posix() for p in NBS.rglob('*.ipynb')
                                         if '.ipynb_checkpoints' not in p.parts and '_proc' not in p.parts))
def test_jupytext_pair_agrees(ipynb):
    "Each notebook has a percent-format script beside it with the same cells."
    import jupytext
    nb_path = NBS / ipynb
    py_path = nb_path.with_suffix('.py')
    assert py_path.exists(), f'{py_path.name} missing: run `jupytext --sync {nb_path}`'
    assert _cells(jupytext.read(nb_path)) == _cells(jupytext.read(py_path)), \
        f'{ipynb} and {py_path.name} differ: run `jupytext --sync` on the one you edited'


def test_quarto_config_single_source():
    "nbs/_quarto.yml (read by nbdev) is an exact copy of the top-level _quarto.yml."
    assert (NBS / '_quarto.yml').read_bytes() == (ROOT / '_quarto.yml').read_bytes(), \
        'nbs/_quarto.yml drifted from _quarto.yml: run `python tools/sync_quarto.py`'


def _readme_commands():
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    blocks = re.findall(r'```(?:sh|bash)\n(.*?)```', text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith('#')]


def test_readme_generated_from_index():
    "README.md is what tools/make_readme.py makes from nbs/index.ipynb."
    out = subprocess.run([sys.executable, str(ROOT / 'tools' / 'make_readme.py'), '--stdout'],
                         capture_output=True, text=True, check=True).stdout
    assert out == (ROOT / 'README.md').read_text(encoding='utf-8'), 'README.md is stale: run `python tools/make_readme.py`'


def test_ci_runs_the_readme_test_command():
    "`.ci/run` runs exactly the README's second set-up command (so a missing install step fails CI)."
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    setup = text.split('## Set-up')[1].split('\n## ')[0]
    cmds = [l.strip() for b in re.findall(r'```(?:sh|bash)\n(.*?)```', setup, flags=re.S)
            for l in b.splitlines() if l.strip() and not l.strip().startswith('#')]
    assert len(cmds) == 2, f'the README set-up section must hold exactly two commands, found {cmds}'
    assert 'uotcrowd demo' in cmds[0] and 'pytest' in cmds[1]
    ci_text = (ROOT / '.ci' / 'run').read_text()
    ci = [l.strip() for l in ci_text.splitlines()]
    assert cmds[1] in ci, f'.ci/run does not run the README test command {cmds[1]!r}'
    # ... inside a virtual environment it creates itself, and a run where nothing passed fails
    assert 'python3 -m venv "$work/venv"' in ci and 'source "$work/venv/bin/activate"' in ci
    assert ci.index('source "$work/venv/bin/activate"') < ci.index(cmds[1])
    assert "grep -Eq '[0-9]+ passed'" in ci_text
