"""`tools/nb_style.py`, the measure of the notebooks' cell discipline, on a percent script made for the test."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('nb_style', ROOT / 'tools' / 'nb_style.py')
nb_style = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nb_style)

SCRIPT = '''# %% [markdown]
# # Title

# %%
#| export
import math

# %%
#| export
LIMIT = 3

def one(x): return x + 1

def two(x): return x; print(x)

# %%
#| export
def three(s='a;b'):
    "Long: ''' + 'x' * 90 + '''"
    return s

# %%
assert one(1) == 2; assert three() == 'a;b'
'''


def test_measures_a_known_script(tmp_path):
    path = tmp_path / 'nb.py'
    path.write_text(SCRIPT)
    m = nb_style.measure([path])
    assert m['exported_cells'] == 2                  # the import cell is not counted
    assert (m['median'], m['largest']) == (3, 3)    # code lines of the definition cells (blanks aside)
    assert (m['several_defs'], m['several_defs_or_names']) == (0.5, 0.5)
    assert m['code_lines'] == 1 + 3 + 3 + 1
    assert m['over_100'] == 1 / 8 and m['over_110'] == 0.
    assert m['with_semicolon'] == 2 / 8             # the ';' inside a string does not count
    assert nb_style.definitions('x = 1\ndef f(): pass\n__all__ = []') == (1, 2)


def test_a_script_without_exported_cells_measures_zeros(tmp_path):
    path = tmp_path / 'plain.py'
    path.write_text('# %% [markdown]\n# # Title\n\n# %%\nx = 1\n')
    m = nb_style.measure([path])
    assert (m['exported_cells'], m['median'], m['p90'], m['largest']) == (0, 0, 0, 0)
    assert m['code_lines'] == 1 and m['several_defs'] == 0.
    assert nb_style.report('plain', m).startswith('plain ')
    single = tmp_path / 'single.py'
    single.write_text('# %%\n#| export\ndef f(x):\n    return x\n')
    assert nb_style.measure([single])['p90'] == 2   # one cell is its own p90
