"""Repository invariants: the library is exported from the notebooks, each module imports only modules of
lower-numbered notebooks, notebooks and their jupytext scripts agree, the Quarto config has one source of truth,
README and .ci/run agree on the test command."""
import ast, filecmp, re, shutil, subprocess, sys
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


def _module_notebooks() -> dict:
    "Generated module name -> the notebook it is exported from (`03a_plans` for `uotcrowd/plans.py`)."
    out = {}
    for py in (ROOT / 'uotcrowd').glob('*.py'):
        head = py.read_text(encoding='utf-8')[:400]
        if 'File to edit: ../nbs/' in head: out[py.stem] = head.split('File to edit: ../nbs/')[1].split('.ipynb')[0]
    return out


def test_modules_import_only_lower_numbered_ones():
    "Every import of a package module, deferred ones included, names a module of a lower-numbered notebook."
    nbs = _module_notebooks()
    assert {'sinkhorn', 'plans', 'images', 'data', 'train'} <= set(nbs)
    bad = []
    for mod, nb in nbs.items():
        for node in ast.walk(ast.parse((ROOT / 'uotcrowd' / f'{mod}.py').read_text(encoding='utf-8'))):
            if not isinstance(node, ast.ImportFrom) or not node.module: continue
            parts = node.module.split('.')
            dep = parts[0] if node.level == 1 else parts[1] if parts[0] == 'uotcrowd' and len(parts) > 1 else None
            if dep in nbs and nbs[dep] >= nb: bad.append(f'{mod} ({nb}) imports {dep} ({nbs[dep]})')
    assert not bad, bad


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


def test_readme_printed_outputs_are_what_the_code_prints(tmp_path):
    "Every README Python example followed by an output block prints that output, exactly (e.g. `loss = 0.0762`)."
    text = (ROOT / 'README.md').read_text(encoding='utf-8')
    pairs = re.findall(r'```python\n(.*?)```\s*\n```\n(.*?)```', text, flags=re.S)
    assert pairs, 'the README shows no printed output: this test would check nothing'
    env = {**__import__('os').environ, 'OMP_NUM_THREADS': '1'}
    for code, shown in pairs:
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout == shown, (code, r.stdout, shown)


SKIP_LOGS = {   # pytest output -> whether .ci/run's skip check lets the run pass
    'no skip': ('12 passed in 3.0s\n', True),
    'allowed': ('=== short test summary info ===\n'
                'SKIPPED [1] tests/test_sinkhorn.py:92: needs CUDA (CPU autocast leaves the solver alone)\n'
                'SKIPPED [2] tests/test_counter.py:70: needs the ShanghaiTech datasets folder beside the checkout (../shared absent)\n'
                '10 passed, 3 skipped in 2.0s\n', True),
    'missing package': ('SKIPPED [1] tests/test_sinkhorn.py:92: needs CUDA\n'
                        "SKIPPED [1] tests/test_bench.py:156: could not import 'geomloss': No module named 'geomloss'\n"
                        '10 passed, 2 skipped in 2.0s\n', False),
    'missing file': ('SKIPPED [1] tests/test_metrics.py:62: ../shared/fixtures/nwpu_loc is absent\n10 passed, 1 skipped\n', False),
    'reasons not printed': ('10 passed, 1 skipped in 3.0s\n', False),
}


@pytest.mark.parametrize('case', list(SKIP_LOGS))
def test_ci_fails_on_a_skip_outside_the_allowlist(case, tmp_path):
    "The skip check of `.ci/run`, run on pytest logs: only the reasons of `tests/skip_allowlist.txt` pass, and they are printed."
    ci = (ROOT / '.ci' / 'run').read_text().splitlines()
    start = next(i for i, l in enumerate(ci) if l.startswith('# a skip is a failure'))
    log, ok = SKIP_LOGS[case]
    (tmp_path / 'test.log').write_text(log)
    script = 'set -euo pipefail\nwork=' + str(tmp_path) + '\ncd ' + str(ROOT) + '\n' + '\n'.join(ci[start:]) + '\n'
    r = subprocess.run(['bash', '-c', script], capture_output=True, text=True)
    assert (r.returncode == 0) == ok, (case, r.stdout, r.stderr)
    for line in log.splitlines():
        if line.startswith('SKIPPED'): assert line.split(': ', 1)[1] in r.stdout, (line, r.stdout)   # every reason shown
    if not ok and case != 'reasons not printed':
        bad = [l for l in log.splitlines() if 'needs' not in l and l.startswith('SKIPPED')]
        assert all(b.split(': ', 1)[1] in r.stderr for b in bad), r.stderr
