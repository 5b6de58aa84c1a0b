"""Measure the notebooks' cell discipline (issue 39): exported-cell sizes, cells with several definitions, long
lines and `;`-joined statements, over the percent-format scripts `nbs/*.py` (or the files given).

Usage: `python tools/nb_style.py [--per-file] [nbs/NN_name.py ...]`
"""
import ast, io, re, statistics, sys, tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r'^# %%(?P<kind>.*)$')


def cells(text: str) -> list[tuple[str, list[str]]]:
    "The cells of a percent script as (kind, lines): kind is 'markdown' or 'code'."
    out, kind, lines = [], None, []
    for line in text.splitlines():
        m = CELL.match(line)
        if m:
            if kind is not None: out.append((kind, lines))
            kind, lines = ('markdown' if '[markdown]' in m['kind'] else 'code'), []
        elif kind is not None: lines.append(line)
    if kind is not None: out.append((kind, lines))
    return out


def code_lines(lines: list[str]) -> list[str]:
    "Lines of a code cell that hold code: not blank, not a `#|` directive."
    return [l for l in lines if l.strip() and not l.lstrip().startswith('#|')]


def is_exported(lines: list[str]) -> bool:
    return any(l.replace(' ', '').startswith('#|export') for l in lines)


def definitions(source: str) -> tuple[int, int]:
    "Top-level (def/class, def/class/assignment) counts of a cell's code; (0, 0) if it does not parse."
    try: tree = ast.parse(source)
    except SyntaxError: return 0, 0
    fns = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)
    targets = lambda n: getattr(n, 'targets', [getattr(n, 'target', None)])
    is_all = lambda n: any(isinstance(t, ast.Name) and t.id == '__all__' for t in targets(n))
    names = sum(isinstance(n, (ast.Assign, ast.AnnAssign)) and not is_all(n) for n in tree.body)
    return fns, fns + names


def semicolon_lines(source: str) -> int:
    "Number of lines holding a `;` token (a statement separator, not a `;` inside a string or comment)."
    try: toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError): return 0
    return len({t.start[0] for t in toks if t.type == tokenize.OP and t.string == ';'})


def measure(paths: list[Path]) -> dict:
    "Style numbers over the code cells of `paths` (exported cells for sizes and definitions)."
    sizes, several_fns, several_any, n_lines, long, very_long, semis = [], 0, 0, 0, 0, 0, 0
    for path in paths:
        for kind, lines in cells(path.read_text(encoding='utf-8')):
            if kind != 'code': continue
            src = '\n'.join(l for l in lines if not l.lstrip().startswith('#|'))
            code = code_lines(lines)
            n_lines += len(code)
            long += sum(len(l) > 100 for l in code)
            very_long += sum(len(l) > 110 for l in code)
            semis += semicolon_lines(src)
            if is_exported(lines) and code:
                fns, anys = definitions(src)
                if fns + anys == 0: continue   # imports only
                sizes.append(len(code))
                several_fns += fns > 1
                several_any += anys > 1
    # deciles; a single cell is its own p90, and a file without exported cells reports zeros
    q = statistics.quantiles(sizes, n=10, method='inclusive') if len(sizes) > 1 else (sizes or [0]) * 9
    return dict(exported_cells=len(sizes), median=statistics.median(sizes) if sizes else 0, p90=q[-1],
                largest=max(sizes, default=0), several_defs=several_fns / max(len(sizes), 1),
                several_defs_or_names=several_any / max(len(sizes), 1), code_lines=n_lines,
                over_100=long / max(n_lines, 1), over_110=very_long / max(n_lines, 1),
                with_semicolon=semis / max(n_lines, 1))


def report(name: str, m: dict) -> str:
    return (f"{name:<22} cells {m['exported_cells']:>4}  median {m['median']:>5.1f}  p90 {m['p90']:>5.1f}  "
            f"max {m['largest']:>4}  several def/class {m['several_defs']:6.1%}  "
            f"several incl. names {m['several_defs_or_names']:6.1%}  lines {m['code_lines']:>5}  "
            f">100 chars {m['over_100']:6.1%}  >110 {m['over_110']:6.1%}  ';' {m['with_semicolon']:6.1%}")


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    paths = [Path(a) for a in args] or sorted((ROOT / 'nbs').glob('*.py'))
    if '--per-file' in sys.argv:
        for p in paths: print(report(p.stem, measure([p])))
    print(report('all', measure(paths)))
