"""The offline documentation preview: built from the nbdev-processed notebooks and checked page by page."""
import re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
sys.path.insert(0, str(ROOT / 'tools'))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.srcs, self.title, self._in_title = [], [], '', False
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
        if tag == 'img' and a.get('src'): self.srcs.append(a['src'])
        if tag == 'title': self._in_title = True
    def handle_endtag(self, tag):
        if tag == 'title': self._in_title = False
    def handle_data(self, data):
        if self._in_title: self.title += data


def _nb_title(path):
    for c in nbformat.read(path, as_version=4).cells:
        if c.cell_type == 'markdown' and c.source.startswith('# '): return c.source.splitlines()[0][2:].strip()


def _notebooks():
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(s.startswith(('.', '_')) for s in p.relative_to(NBS).parts))


@pytest.fixture(scope='module')
def preview(tmp_path_factory):
    import build_preview
    return build_preview.build(tmp_path_factory.mktemp('site') / 'preview')


@pytest.mark.xdist_group('docs')
def test_every_notebook_has_a_titled_page(preview):
    for nb in _notebooks():
        page = preview / nb.relative_to(NBS).with_suffix('.html')
        assert page.exists(), f'no page for {nb.name}'
        p = _Links(); p.feed(page.read_text(encoding='utf-8'))
        assert p.title == _nb_title(nb), f'{page.name}: title {p.title!r} != notebook title {_nb_title(nb)!r}'


@pytest.mark.xdist_group('docs')
def test_figures_exist_and_links_resolve(preview):
    for nb in _notebooks():
        page = preview / nb.relative_to(NBS).with_suffix('.html')
        p = _Links(); p.feed(page.read_text(encoding='utf-8'))
        n_png = sum('image/png' in o.get('data', {}) for c in nbformat.read(nb, as_version=4).cells
                    if c.cell_type == 'code' for o in c.get('outputs', []))
        local = [s for s in p.srcs if not s.startswith(('http', 'data:'))]
        assert len(local) >= n_png, f'{page.name}: {n_png} figures in the notebook, {len(local)} images on the page'
        for src in local:
            f = page.parent / src
            assert f.exists() and f.stat().st_size > 0, f'{page.name}: image {src} missing or empty'
        for href in p.hrefs:
            if href.startswith(('http', 'mailto:', '#')): continue
            target = (page.parent / href.split('#')[0])
            assert target.exists(), f'{page.name}: broken internal link {href}'


@pytest.mark.xdist_group('docs')
def test_maths_rendered_as_mathml(preview):
    html = (preview / '00_core.html').read_text(encoding='utf-8')
    assert html.count('<math') >= 3 and '$$' not in html


def test_mathml_conversion_keeps_code():
    import build_preview
    out = build_preview.math_to_mathml('cost $C_{ij}$ and `$not maths$` and $$\\sum_i a_i$$')
    assert out.count('<math') == 2 and '`$not maths$`' in out


@pytest.mark.xdist_group('docs')
def test_home_page_screenshot(preview, tmp_path):
    "Headless Chromium renders the home page (skipped where Debian's chromium is not installed)."
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if not exe: pytest.skip('chromium is not installed')
    shot = tmp_path / 'home.png'
    subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                    '--disable-background-networking', '--disable-component-update', '--disable-sync',
                    f'--user-data-dir={tmp_path / "profile"}', '--window-size=1280,1400', f'--screenshot={shot}',
                    (preview / 'index.html').as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image
    img = Image.open(shot).convert('L')
    assert img.size == (1280, 1400)
    lo, hi = img.getextrema()
    assert hi - lo > 100, 'the screenshot is blank'


def test_home_page_numbers_come_from_stored_results(monkeypatch):
    "Each number-bearing output of the home page is what its cell makes now from the stored results files."
    cells = [c for c in nbformat.read(NBS / 'index.ipynb', as_version=4).cells
             if c.cell_type == 'code' and c.source.startswith('#| echo: false')]
    assert len(cells) >= 2
    monkeypatch.chdir(NBS)  # the cells read paths relative to nbs/, as when the notebook runs
    ns = {}
    for c in cells:
        stored = [o['data']['text/markdown'] for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})]
        assert len(stored) == 1, 'nbs/index.ipynb has no stored output for a results cell: execute it'
        body, last = c.source.rstrip().rsplit('\n', 1)
        exec(compile(body, 'index.ipynb', 'exec'), ns)
        assert eval(last, ns).data == stored[0], f'stale home-page output of `{last}`: execute nbs/index.ipynb'
    assert any(ch.isdigit() for ch in stored[0])
