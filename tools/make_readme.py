"""Make README.md from nbs/index.ipynb, as `nbdev_readme` does on a host with Quarto.

Quarto cannot be installed on the project's build machines, so this small converter keeps the README in sync:
markdown cells are copied, the title/summary become a heading and a quote, code cells become ```python blocks
followed by their text output; cells flagged `#| hide` are left out and image outputs are skipped.
Run `python tools/make_readme.py` after editing nbs/index.py/.ipynb (`--stdout` prints instead of writing).
"""
import re, sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _directives(src):
    return {l[3:].split(':')[0].strip() for l in src.splitlines() if l.startswith('#|')}


def _body(src):
    return '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()


def readme_text(nb_path=ROOT / 'nbs' / 'index.ipynb'):
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for cell in nb.cells:
        src = cell.source
        if 'hide' in _directives(src) or 'include' in _directives(src): continue
        if cell.cell_type == 'markdown':
            parts.append(src.strip())
        elif cell.cell_type == 'code':
            if 'echo' not in _directives(src) and _body(src):
                if parts and parts[-1].startswith('```python\n'):  # consecutive cells read as one block
                    parts[-1] = parts[-1][:-3] + f'\n{_body(src)}\n```'
                else: parts.append(f'```python\n{_body(src)}\n```')
            texts = []
            for out in cell.get('outputs', []):
                if out.output_type == 'stream': texts.append(out.text)
                elif 'text/markdown' in out.get('data', {}): parts.append(out['data']['text/markdown'])
                elif 'text/plain' in out.get('data', {}) and 'image/png' not in out['data']: texts.append(out['data']['text/plain'])
            if texts: parts.append('```\n' + ''.join(texts).rstrip() + '\n```')
    parts = [re.sub(r'\]\((?!https?:|#|/)([^)]+)\)', r'](nbs/\1)', part) for part in parts]  # links relative to nbs/
    header = '<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->'
    return header + '\n\n' + '\n\n'.join(p for p in parts if p) + '\n'


if __name__ == '__main__':
    text = readme_text()
    if '--stdout' in sys.argv: sys.stdout.write(text)
    else: (ROOT / 'README.md').write_text(text, encoding='utf-8'); print('README.md written')
