# %% [markdown]
# # Predict
#
# > `uotcrowd predict`: count photos, folders of them and videos with one `Counter`, and write the counts, located heads, pictures and NWPU-Crowd submission files.

# %%
#| default_exp predict

# %%
#| export
from __future__ import annotations
import json, sys
from pathlib import Path
from typing import Sequence
import numpy as np
import torch
from uotcrowd.core import reuse_host_memory, HostMemory
from uotcrowd.images import normalize, list_images, IMAGE_EXTS
from uotcrowd.train import write_csv
from uotcrowd.precision import Precision
from uotcrowd.metrics import write_nwpu_predictions
from uotcrowd.plots import plot_prediction
from uotcrowd.counter import Counter, as_rgb, DEFAULT_MODEL
from uotcrowd.video import VIDEO_EXTS, is_video, predict_video

# %%
#| hide
import contextlib, csv, io, tempfile
from PIL import Image
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.video import SquareCounter, square_frames, VideoWriter


# %% [markdown]
# `predict` is `uotcrowd predict`: it counts image files, folders of them and videos with one `Counter`
# (`uotcrowd.counter`), so named models, tiling of large photos and videos all work from the command line.

# %% [markdown]
# ## The files of counted photos
#
# For the photos, `predictions.csv` has a row per photo (name, path, count, located heads, tiles, and the error
# of a photo that could not be read), `points.json` the count and heads of each counted photo, and with `nwpu`
# the NWPU-Crowd submission files: `nwpu_count.txt` (`ID count` lines) and `nwpu_loc.txt`
# (`uotcrowd.metrics.write_nwpu_predictions`), with the photo's number as its ID when its name is one.

# %%
#| export
def _write_photo_files(results:list[dict], # a row per photo: `name`, `path`, `count`, `n_points`, `points`...
                       out:Path, # the output folder
                       nwpu:bool # also write the NWPU-Crowd submission files
                      ) -> list[Path]: # the files written
    "`predictions.csv`, `points.json` and, with `nwpu`, the NWPU-Crowd submission files of counted photos."
    write_csv(results, out / 'predictions.csv', ['name', 'path', 'count', 'n_points', 'tiles', 'error'])
    good = [r for r in results if r['count'] is not None]
    (out / 'points.json').write_text(json.dumps({r['name']: {'count': r['count'], 'points': r['points']}
                                                 for r in good}))
    written = [out / 'predictions.csv', out / 'points.json']
    if nwpu and good:
        ids = [int(r['name']) if str(r['name']).isdigit() else k + 1 for k, r in enumerate(good)]
        (out / 'nwpu_count.txt').write_text(''.join(f"{i} {r['count']:.4f}\n" for i, r in zip(ids, good)))
        located = {i: np.asarray(r['points'], np.float64).reshape(-1, 2) for i, r in zip(ids, good)}
        written += [out / 'nwpu_count.txt', write_nwpu_predictions(out / 'nwpu_loc.txt', located)]
    return written


# %%
with tempfile.TemporaryDirectory() as d:
    rows = [{'name': '3120', 'path': 'a/3120.jpg', 'count': 2.5, 'n_points': 1, 'tiles': 1,
             'points': [[4., 5.]]},
            {'name': 'odd', 'path': 'a/odd.jpg', 'count': None, 'n_points': None, 'points': [],
             'error': 'broken'}]
    written = _write_photo_files(rows, Path(d), nwpu=True)
    test_eq([p.name for p in written], ['predictions.csv', 'points.json', 'nwpu_count.txt', 'nwpu_loc.txt'])
    test_eq(json.loads((Path(d) / 'points.json').read_text()), {'3120': {'count': 2.5, 'points': [[4., 5.]]}})
    test_eq((Path(d) / 'nwpu_count.txt').read_text(), '3120 2.5000\n')
    with open(Path(d) / 'predictions.csv') as fh:
        test_eq([r['error'] for r in csv.DictReader(fh)], ['', 'broken'])


# %% [markdown]
# ## `predict`: photos, folders and videos
#
# For images `predict` writes those files and a `NAME_pred.png` per image (`uotcrowd.plots.plot_prediction`); a
# file that cannot be read is reported and skipped, and the error at the end names it. For each video it writes
# what `uotcrowd.video.predict_video` writes.

# %%
#| export
def predict(inputs:Sequence[str], # image or video files, or folders of them
            out:str, # output folder
            checkpoint:str=DEFAULT_MODEL, # checkpoint file or named model (`uotcrowd models`)
            loc_threshold:float|None=None, # localization threshold (default: the checkpoint's, else 0.05)
            # tile side in pixels for large images (default: above 2.5 megapixels; 0: never)
            tile:int|None=None,
            every:int=1, # videos: count every N-th frame
            # videos: also write NAME_annotated.mp4 (density, heads and count of each frame)
            annotate:bool=False,
            nwpu:bool=False, # also write the NWPU-Crowd counting and localization submission files
            no_plots:bool=False, # skip the PNGs
            dpi:int=80, # resolution of the PNGs
            precision:Precision|None=None, # 'auto', 'fp32', 'bf16' or 'fp16' (default: the checkpoint's)
            device:str='auto', # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
            # 'reuse': freed host memory stays for the next image (glibc); 'release'
            host_memory:HostMemory='reuse',
            quiet:bool=False # no per-file lines
           ) -> list[dict]: # a dict per image (name, path, count, points, ...) and per video (frames, csv)
    "Count the people in images and videos; writes CSV, JSON and a PNG per image, counts per frame per video."
    with reuse_host_memory(host_memory):
        counter = checkpoint if isinstance(checkpoint, Counter) else Counter(
            checkpoint, device=device, precision=precision, loc_threshold=loc_threshold, tile=tile)
        files = list_images(inputs, IMAGE_EXTS + VIDEO_EXTS, 'image or video')  # folders: images and videos
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        images, videos = [f for f in files if not is_video(f)], [f for f in files if is_video(f)]
        stems = [f.stem for f in images]
        if len(set(stems)) < len(stems): stems = [f"{f.parent.name}_{f.stem}" for f in images]
        results, failed = [], []
        for f, stem in zip(images, stems):
            try: rgb = as_rgb(f)
            except (ValueError, OSError) as e:  # a corrupt file is reported, the others are still counted
                print(f"uotcrowd predict: skipped {e}", file=sys.stderr, flush=True)
                failed.append(str(f))
                results.append({'name': stem, 'path': str(f), 'count': None, 'n_points': None, 'points': [],
                                'error': str(e)})
                continue
            r = counter(rgb)
            results.append({'name': stem, 'path': str(f), 'count': r.count, 'n_points': len(r.points),
                            'tiles': r.tiles, 'points': np.round(r.points.astype(np.float64), 2).tolist()})
            if not no_plots:
                plot_prediction(normalize(torch.from_numpy(rgb).permute(2, 0, 1)),
                                torch.from_numpy(r.density), torch.from_numpy(r.points),
                                title=f'{f.name}: {r.count:.1f} people', path=out / f'{stem}_pred.png',
                                dpi=dpi)
            tiles = f" ({r.tiles} tiles)" if r.tiles > 1 else ''
            if not quiet: print(f"{f}: count {r.count:.1f}, {len(r.points)} points{tiles}", flush=True)
        written = _write_photo_files(results, out, nwpu) if images else []
        for v in videos:
            res = predict_video(str(v), counter, out=str(out), every=every, annotate=annotate, quiet=True)
            results.append({'name': v.stem, 'path': str(v), 'frames': len(res['rows']),
                            'csv': str(res['csv'])})
            written += [res['csv'], res['plot']] + ([res['video']] if res['video'] else [])
            mean = np.mean([r['count'] for r in res['rows']])
            if not quiet: print(f"{v}: {len(res['rows'])} frames counted, mean count {mean:.1f}", flush=True)
        if not quiet:
            n_png = 0 if no_plots else len(images) - len(failed)
            pngs = f" and {n_png} PNGs (*_pred.png) in {out}" if n_png else ''
            print(f"wrote {', '.join(map(str, written))}{pngs}")
        if failed:
            raise ValueError(f"{len(failed)} of {len(files)} files could not be read ({', '.join(failed)}); "
                             f"the others are in {out}")
    return results


# %% [markdown]
# Square frames (`uotcrowd.video.square_frames`) saved as photos, one of them 1200×1600 (tiled automatically
# above `tile_above`, here lowered), a video of them, and a corrupt file, all in one folder: each photo's count
# is its number of squares, the video gets its counts per frame, and the corrupt file is named at the end.

# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    (d / 'in').mkdir()
    frames = square_frames(4)
    for k, f in enumerate(frames): Image.fromarray(f).save(d / 'in' / f'{k + 1:04d}.png')
    big = np.zeros((1200, 1600, 3), np.uint8)
    big[:96, :128] = frames[3]   # 4 squares
    big[-96:, -128:] = frames[1]   # and 2
    Image.fromarray(big).save(d / 'in' / 'big.png')
    with VideoWriter(d / 'in' / 'clip.mp4', 10) as vw:
        for f in square_frames(8): vw.write(f)
    (d / 'in' / 'broken.jpg').write_bytes(b'not a photo')
    sq = Counter(SquareCounter(), device='cpu', tile_above=1_000_000)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        test_fail(lambda: predict([str(d / 'in')], str(d / 'out'), sq, nwpu=True, quiet=True),
                  contains='1 of 7 files could not be read')
    assert 'broken.jpg' in err.getvalue()
    with open(d / 'out' / 'predictions.csv') as fh: rows = {r['name']: r for r in csv.DictReader(fh)}
    test_eq({k: (round(float(r['count']), 3), r['n_points'], r['tiles'])
             for k, r in rows.items() if r['count']},
            {'0001': (1, '1', '1'), '0002': (2, '2', '1'), '0003': (3, '3', '1'), '0004': (4, '4', '1'),
             'big': (6, '6', '4')})
    test_eq(sorted(p.name for p in (d / 'out').glob('*_pred.png')),
            ['0001_pred.png', '0002_pred.png', '0003_pred.png', '0004_pred.png', 'big_pred.png'])
    test_eq((d / 'out' / 'nwpu_count.txt').read_text().splitlines()[:2], ['1 1.0000', '2 2.0000'])
    with open(d / 'out' / 'clip_counts.csv') as fh:
        test_close([float(r['count']) for r in csv.DictReader(fh)], [1, 2, 3, 4] * 2, eps=0.03)
    test_fail(lambda: predict([str(d / 'missing.jpg')], str(d / 'out2'), sq),
              contains='missing.jpg is neither')

# %% [markdown]
# Without a checkpoint, `predict` counts with the published default model (`DEFAULT_MODEL`, the one `Counter()`
# and `uotcrowd serve` use): its count of a ShanghaiTech B photo is the count of that model loaded by name.

# %%
photo = Path('../tests/fixtures/ShanghaiTech/part_B/train_data/images/IMG_9.jpg')   # 1024×768, 167 heads
with tempfile.TemporaryDirectory() as d:
    row, = predict([str(photo)], d, no_plots=True, quiet=True, device='cpu')
    test_close(row['count'], Counter(DEFAULT_MODEL, device='cpu')(photo).count, eps=1e-4)

# %%
#| hide
import nbdev
nbdev.nbdev_export()
