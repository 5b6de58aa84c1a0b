"""Offline preview of the documentation site (Quarto cannot be installed on the project's machines).

1. nbdev processes a private copy of the notebooks into a `_proc/` of its own (so parallel builds never share one),
   exactly as `nbdev_docs` does before Quarto runs (frontmatter from the title cell, `show_doc` API sections for every
   exported symbol, hidden cells dropped).
2. Each processed notebook becomes a static HTML page (nbconvert's `basic` template) with its figures written as image
   files next to it, maths converted to MathML (rendered natively by browsers, no network needed), links to other
   notebooks pointed at their pages, and the sidebar taken from `_quarto.yml`.

Usage: `python tools/build_preview.py [OUT_DIR]` (default `_preview/`); open OUT_DIR/index.html.
"""
from __future__ import annotations

import fnmatch, html, re, shutil, subprocess, sys, tempfile
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;display:flex;color:#212529;line-height:1.5}
nav{width:250px;min-width:250px;background:#f7f7f9;border-right:1px solid #ddd;padding:1rem;height:100vh;position:sticky;top:0;overflow-y:auto}
nav a{display:block;color:#2780e3;text-decoration:none;padding:2px 0}nav a.active{font-weight:bold;color:#111}
nav .section{margin-top:.8rem;font-weight:600;color:#555;font-size:.9rem;text-transform:uppercase}
nav .site{font-size:1.4rem;font-weight:700;margin-bottom:.5rem}
main{max-width:980px;padding:1.5rem 2.5rem;flex:1;overflow-x:auto}
h1.title{margin-top:0}p.description{font-style:italic;font-size:1.2rem;opacity:.75}
pre{background:#f8f8f8;padding:.6rem;overflow-x:auto;border-radius:4px}
.jp-OutputArea-output pre{background:none;border-left:2px solid lightsalmon;padding-left:.8rem}
img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:2px 6px}
.jp-InputPrompt,.jp-OutputPrompt,.prompt{display:none}
"""


def _frontmatter(nb):
    "Title/description from nbdev's frontmatter raw cell (removed from the notebook)."
    meta = {}
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'raw' and c.source.lstrip().startswith('---'):
            meta = yaml.safe_load(c.source.strip().strip('-')) or {}
            del nb.cells[i]
            break
    return meta


def _mathml(tex, display):
    from latex2mathml.converter import convert
    tex = tex.replace(r'\boldsymbol', r'\mathbf').replace(r'\operatorname', r'\mathrm')
    try: return convert(tex.strip(), display='block' if display else 'inline')
    except Exception: return f'<code class="tex">{html.escape(tex)}</code>'


_MATH_BLOCK = re.compile(r'\$\$(.+?)\$\$', re.S)
_MATH_INLINE = re.compile(r'(?<![\\$])\$(?!\s)((?:[^$\n]|\n(?!\n))+?)(?<!\s)\$(?!\$)')


def math_to_mathml(md: str) -> str:
    "Replace `$$..$$` and `$..$` (outside code) in markdown by MathML."
    pieces = re.split(r'(```.*?```|`[^`\n]*`)', md, flags=re.S)
    for k in range(0, len(pieces), 2):
        s = _MATH_BLOCK.sub(lambda m: '\n\n' + _mathml(m.group(1), True) + '\n\n', pieces[k])
        pieces[k] = _MATH_INLINE.sub(lambda m: _mathml(m.group(1), False), s)
    return ''.join(pieces)


def _quarto_md(md: str) -> str:
    "Markdown with Quarto-only syntax (link attributes `[..](..){..}`) removed and maths as MathML."
    md = re.sub(r'(\]\([^)]*\))\{[^}]*\}', r'\1', md)
    return math_to_mathml(md)


def _directives(src):
    return {l[3:].split(':')[0].strip(): l.split(':', 1)[1].strip() if ':' in l else ''
            for l in src.splitlines() if l.startswith('#|')}


def _prepare(nb):
    "Apply the Quarto cell options that matter to a static page; convert maths."
    cells = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            c.source = _quarto_md(c.source); cells.append(c); continue
        if c.cell_type != 'code': continue
        d = _directives(c.source)
        if d.get('include') == 'false': continue
        if d.get('output') == 'false': c.outputs = []
        c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|')).strip()
        for o in c.get('outputs', []):
            if 'text/markdown' in o.get('data', {}): o['data']['text/markdown'] = _quarto_md(o['data']['text/markdown'])
        if d.get('echo') == 'false' or not c.source:
            if not c.get('outputs'): continue
            c.metadata.setdefault('tags', []).append('remove_input')
        cells.append(c)
    nb.cells = cells
    return nb


def _sidebar(pages: dict[str, str]):
    "Sidebar entries `(section or None, rel_html)` following the `_quarto.yml` sidebar."
    cfg = yaml.safe_load((ROOT / '_quarto.yml').read_text())
    entries = []

    def add(items, section=None):
        for it in items if isinstance(items, list) else [items]:
            if isinstance(it, dict) and 'section' in it:
                entries.append((it['section'], None)); add(it.get('contents', []), it['section'])
            else:
                pat = it if isinstance(it, str) else it.get('href', '')
                for rel in sorted(p for p in pages if fnmatch.fnmatch(p, pat.replace('.ipynb', '.html'))):
                    entries.append((None, rel))
    add(cfg['website']['sidebar']['contents'])
    listed = {r for _, r in entries if r}
    entries += [(None, r) for r in sorted(pages) if r not in listed]
    return entries, cfg['website']['title']


def _page(rel, title, desc, body, entries, site, titles):
    up = '../' * rel.count('/')
    nav = [f'<div class="site"><a href="{up}index.html">{html.escape(site)}</a></div>']
    for section, r in entries:
        if section: nav.append(f'<div class="section">{html.escape(section)}</div>')
        else: nav.append(f'<a class="{"active" if r == rel else ""}" href="{up}{r}">{html.escape(titles[r])}</a>')
    desc_html = f'<p class="description">{html.escape(desc)}</p>' if desc else ''
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body><nav>{"".join(nav)}</nav><main><h1 class="title">{html.escape(title)}</h1>{desc_html}{body}</main></body></html>')


def _link_fix(body):
    body = re.sub(r'href="([^":#]+?)\.ipynb(#[^"]*)?"', lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', body)
    return re.sub(r'href="([^":#]+?)\.qmd(#[^"]*)?"', lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', body)


def process_notebooks(work: Path) -> Path:
    "nbdev's docs processing (as `nbdev_docs` runs it) of a private copy of `nbs/` in `work`; returns its `_proc/`."
    work = Path(work)
    shutil.copy(ROOT / 'settings.ini', work / 'settings.ini')
    shutil.copytree(NBS, work / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc', '*.pt'))
    # a child process: nbdev caches its configuration per process, and the copy has a settings.ini of its own
    code = "from nbdev.serve import proc_nbs; proc_nbs(path='nbs', n_workers=0, force=True, skip_file_glob='*.py')"
    subprocess.run([sys.executable, '-c', code], cwd=work, check=True)
    return work / '_proc'


def build(out: Path = ROOT / '_preview', proc: bool = True) -> Path:
    "Write the preview to `out`; each build processes the notebooks in a temporary folder of its own."
    with tempfile.TemporaryDirectory(prefix='uotcrowd-proc-') as work:
        return _render(process_notebooks(Path(work)) if proc else ROOT / '_proc', Path(out))


def _render(cache: Path, out: Path) -> Path:
    "Static HTML pages for the processed notebooks in `cache`."
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExtractOutputPreprocessor, TagRemovePreprocessor
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    notebooks = sorted(p for p in cache.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    rendered = {}
    for nb_path in notebooks:
        rel = nb_path.relative_to(cache).with_suffix('.html').as_posix()
        nb = nbformat.read(nb_path, as_version=4)
        meta = _frontmatter(nb)
        title = str(meta.get('title') or nb_path.stem)
        exporter = HTMLExporter(template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True)
        exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={'remove_input'}), enabled=True)
        exporter.register_preprocessor(ExtractOutputPreprocessor(), enabled=True)
        stem = Path(rel).stem
        body, res = exporter.from_notebook_node(_prepare(nb), resources={'output_files_dir': f'{stem}_files', 'unique_key': stem})
        page_dir = (out / rel).parent
        page_dir.mkdir(parents=True, exist_ok=True)
        for name, data in res.get('outputs', {}).items():
            (page_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (page_dir / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        rendered[rel] = (title, str(meta.get('description') or ''), _link_fix(body))
    entries, site = _sidebar(rendered)
    titles = {rel: page[0] for rel, page in rendered.items()}
    for rel, (title, desc, body) in rendered.items():
        (out / rel).write_text(_page(rel, title, desc, body, entries, site, titles), encoding='utf-8')
    for asset in cache.rglob('*'):  # figures and styles the notebooks' markdown refers to
        if asset.is_file() and asset.suffix.lower() in ('.png', '.jpg', '.jpeg', '.svg', '.gif', '.css'):
            dest = out / asset.relative_to(cache)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(asset, dest)
    return out


if __name__ == '__main__':
    dest = build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / '_preview')
    print(f'preview written to {dest}/index.html')
