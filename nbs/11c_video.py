# %% [markdown]
# # Video
#
# > Count people in the frames of a video: videos read and written with PyAV, counts per frame to CSV, a plot of the count over time, and optionally an annotated video.

# %%
#| default_exp video

# %%
#| export
from __future__ import annotations
from fractions import Fraction
from pathlib import Path
import numpy as np
import torch
from torch import nn
from uotcrowd.images import IMAGENET_MEAN, IMAGENET_STD
from uotcrowd.train import write_csv
from uotcrowd.precision import Precision
from uotcrowd.plots import plot_counts
from uotcrowd.counter import Counter, render_result

# %%
#| hide
import csv, tempfile
from PIL import Image
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# `predict_video` counts every `every`-th frame of a video with a `Counter` and writes the counts per frame
# (`NAME_counts.csv`: frame, time in seconds, count, located heads), a plot of the count over time
# (`NAME_counts.png`, `uotcrowd.plots.plot_counts`) and, with `annotate=True`, a video of the counted frames
# with their density, heads and count (`NAME_annotated.mp4`, H.264, drawn by
# `uotcrowd.counter.render_result`). Videos are decoded with PyAV, whose wheels ship their own FFmpeg: `pip
# install "uotcrowd[video]"`. `uotcrowd predict` (`uotcrowd.predict`) calls it for every video it is given.

# %%
import av   # PyAV: the `video` extra, and the `dev` extra the tests run with (a missing one fails here)

# %% [markdown]
# ## Video files
#
# A file is taken for a video by its extension, so that folders holding photos and videos can be counted
# together.

# %%
#| export
VIDEO_EXTS = ('.mp4', '.m4v', '.mov', '.avi', '.mkv', '.webm', '.mpg', '.mpeg', '.wmv', '.flv',
              '.ts')   # the file extensions taken for videos


# %%
#| export
def is_video(path:str|Path # a file name
            ) -> bool:
    "Whether `path` has a video file extension (`VIDEO_EXTS`)."
    return Path(path).suffix.lower() in VIDEO_EXTS


# %%
test_eq((is_video('clip.MP4'), is_video('folder/clip.webm'), is_video('photo.jpg')), (True, True, False))


# %% [markdown]
# PyAV is imported when a video is first read or written; without it, the error says how to install it. Errors
# name the file: a missing file, one that is not a video, one without a video stream.

# %%
#| export
def _av():
    try: import av
    except ImportError as e:
        raise ImportError("reading videos needs PyAV, which ships its own FFmpeg: pip install 'uotcrowd[video]' "
                          "(or: pip install av)") from e
    return av


# %%
#| export
def _open_video(path:Path):
    av = _av()
    if not path.is_file(): raise FileNotFoundError(f"video {path} does not exist")
    try: container = av.open(str(path))
    except av.error.FFmpegError as e: raise ValueError(f"{path}: not a readable video ({e})") from e
    if not container.streams.video:
        container.close(); raise ValueError(f"{path}: the file has no video stream")
    return av, container


# %%
#| export
def video_fps(path:str|Path # video file
             ) -> float|None:
    "Frames per second of the first video stream (None when the file does not say)."
    _, c = _open_video(Path(path))
    with c:
        s = c.streams.video[0]
        rate = s.average_rate or s.guessed_rate
        return float(rate) if rate else None


# %%
#| export
def read_video(path:str|Path, # video file
               every:int=1, # keep every N-th frame
               max_frames:int|None=None # stop after this many kept frames
              ):
    "Yield `(frame index, time in seconds, (H, W, 3) uint8 RGB frame)` for every `every`-th frame."
    path = Path(path)
    if every < 1: raise ValueError(f"every must be at least 1, got {every}")
    av, container = _open_video(path)
    with container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        kept, i = 0, -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % every: continue
                t = float(frame.time) if frame.time is not None else (i / float(rate) if rate else float(i))
                yield i, t, frame.to_ndarray(format='rgb24')
                kept += 1
                if max_frames is not None and kept >= max_frames: return
        except av.error.FFmpegError as e:
            raise ValueError(f"{path}: decoding failed after frame {i}: {e}") from e
    if kept == 0: raise ValueError(f"{path}: no frame could be decoded")


# %%
#| export
class VideoWriter:
    "Write RGB frames to an H.264 (or MPEG-4) video with PyAV; odd sides lose a pixel (4:2:0 needs even sides)."
    def __init__(self, path:str|Path, # output file (`.mp4`)
                 fps:float # frames per second
                ):
        self.av, self.path, self.fps = _av(), Path(path), Fraction(fps).limit_denominator(1001)
        self.container, self.stream = None, None

    def write(self, frame:np.ndarray # `(H, W, 3)` uint8 RGB
             ):
        if self.stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = self.av.open(str(self.path), 'w')
            codecs = self.av.codecs_available
            self.stream = self.container.add_stream('libx264' if 'libx264' in codecs else 'mpeg4', rate=self.fps)
            self.stream.height, self.stream.width = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            self.stream.pix_fmt = 'yuv420p'
        h, w = self.stream.height, self.stream.width
        vf = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]), format='rgb24')
        for packet in self.stream.encode(vf): self.container.mux(packet)

    def close(self):
        if self.stream is not None:
            for packet in self.stream.encode(): self.container.mux(packet)
            self.container.close()
            self.stream = None

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()


# %% [markdown]
# ## A test video
#
# A video made here: frame $k$ shows $(k \bmod 4) + 1$ white 16×16 squares on black, and `SquareCounter`
# returns each 4×4 cell's brightness divided by a square's area, so that the count of a frame is its number of
# squares. Written at 10 frames per second and read back, the video has its frames, its rate and their times;
# every 5th frame, at most 2, gives 2 frames; what is not a video is refused with its name.

# %%
#| export
def square_frames(n:int=12, # frames
                  height:int=96, width:int=128 # frame size
                 ) -> list[np.ndarray]:
    "Frame k: (k mod 4) + 1 white 16×16 squares on black, 32 px apart."
    frames = []
    for k in range(n):
        f = np.zeros((height, width, 3), np.uint8)
        for j in range(k % 4 + 1):
            row, col = 16 + 32 * (j // 3), 16 + 32 * (j % 3)
            f[row:row + 16, col:col + 16] = 255
        frames.append(f)
    return frames


# %%
#| export
class SquareCounter(nn.Module):
    "Counts white 16×16 squares: each 4×4 cell's brightness (mean over RGB, 0..1) × 16 / 256 (a test network)."
    stride = 4
    def forward(self, x):
        std, mean = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (IMAGENET_STD, IMAGENET_MEAN))
        return torch.nn.functional.avg_pool2d((x * std + mean).mean(1, keepdim=True), 4) * 16 / 256


# %%
test_eq([int((f == 255).all(-1).sum()) for f in square_frames(5)], [256, 512, 768, 1024, 256])
sq = Counter(SquareCounter(), device='cpu')
test_eq([round(sq(f).count, 4) for f in square_frames(4)], [1, 2, 3, 4])
test_eq([len(sq(f).points) for f in square_frames(4)], [1, 2, 3, 4])
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    with VideoWriter(d / 'squares.mp4', 10) as vw:
        for f in square_frames(): vw.write(f)
    test_close(video_fps(d / 'squares.mp4'), 10.)
    back = list(read_video(d / 'squares.mp4'))
    test_eq((len(back), back[0][2].shape, [i for i, _, _ in back[:3]]), (12, (96, 128, 3), [0, 1, 2]))
    test_close([t for _, t, _ in back[:3]], [0, 0.1, 0.2], eps=1e-6)
    test_eq([round(sq(f).count) for _, _, f in back[:4]], [1, 2, 3, 4])            # the squares survive H.264
    test_eq([i for i, _, _ in read_video(d / 'squares.mp4', every=5, max_frames=2)], [0, 5])
    (d / 'notes.mp4').write_text('not a video')
    test_fail(lambda: list(read_video(d / 'notes.mp4')), contains='notes.mp4: not a readable video')
    test_fail(lambda: list(read_video(d / 'missing.mp4')), contains='missing.mp4 does not exist')
    test_fail(lambda: list(read_video(d / 'squares.mp4', every=0)), contains='every must be at least 1')


# %% [markdown]
# ## Counting a video
#
# Frames are counted `batch_size` at a time (frames of one video have one size, so they are stacked into
# batches); each counted frame gives one row, and with `annotate` one frame of the annotated video, whose rate
# is the video's divided by `every`.

# %%
#| export
def predict_video(video:str, # video file (whatever FFmpeg reads: mp4, mov, avi, mkv, webm, ...)
                  checkpoint:str, # checkpoint file or named model (a `Counter` is also accepted)
                  out:str='predict_out', # output folder
                  every:int=1, # count every N-th frame
                  annotate:bool=False, # also write NAME_annotated.mp4: counted frames with density, heads, count
                  max_frames:int|None=None, # stop after this many counted frames
                  device:str='auto', # 'auto', 'cpu', 'cuda', 'mps'
                  precision:Precision|None=None, # default: the checkpoint's
                  loc_threshold:float|None=None, # default: the checkpoint's
                  tile:int|None=None, # tile side for large frames (None automatic, 0 never)
                  batch_size:int=4, # frames counted together
                  quiet:bool=False # no progress output
                 ) -> dict: # `rows` (one dict per counted frame) and the paths written: `csv`, `plot`, `video`
    "Count people in the frames of a video: counts per frame to CSV, a plot over time, an annotated video."
    counter = checkpoint if isinstance(checkpoint, Counter) else Counter(
        checkpoint, device=device, precision=precision, loc_threshold=loc_threshold, tile=tile,
        batch_size=batch_size)
    video, out = Path(video), Path(out)
    fps = video_fps(video)                # also checks that the file is a readable video
    out.mkdir(parents=True, exist_ok=True)
    writer = VideoWriter(out / f'{video.stem}_annotated.mp4', (fps or 25.0) / every) if annotate else None
    rows, frames = [], []
    def flush():
        for (i, t, rgb), r in zip(frames, counter([f[2] for f in frames])):
            rows.append({'frame': i, 'time_s': round(t, 4), 'count': round(r.count, 4),
                         'n_points': len(r.points)})
            if writer is not None: writer.write(np.asarray(render_result(rgb, r, label=True)))
            if not quiet: print(f"{video.name} frame {i} ({t:.2f} s): count {r.count:.1f}", flush=True)
        frames.clear()
    try:
        for item in read_video(video, every, max_frames):
            frames.append(item)
            if len(frames) == counter.batch_size: flush()
        flush()
    finally:
        if writer is not None: writer.close()
    csv_path = write_csv(rows, out / f'{video.stem}_counts.csv', ['frame', 'time_s', 'count', 'n_points'])
    plot_path = out / f'{video.stem}_counts.png'
    plot_counts(rows, plot_path, title=f'{video.name}: count per frame ({counter.name})')
    res = {'rows': rows, 'csv': csv_path, 'plot': plot_path, 'video': writer.path if writer else None}
    if not quiet: print(f"wrote {csv_path}, {plot_path}" + (f", {writer.path}" if writer else ''))
    return res


# %% [markdown]
# The test video, 12 frames at 10 frames per second, counted with `every=3`: frames 0, 3, 6, 9, showing 1, 4,
# 3 and 2 squares, at 0, 0.3, 0.6 and 0.9 s; the annotated video has those 4 frames at 10/3 frames per second.
# A file that is not a video is refused before anything is written.

# %%
with tempfile.TemporaryDirectory() as d:
    d = Path(d)
    with VideoWriter(d / 'squares.mp4', 10) as vw:
        for f in square_frames(): vw.write(f)
    res = predict_video(str(d / 'squares.mp4'), sq, out=str(d / 'out'), every=3, annotate=True, quiet=True)
    test_eq([r['frame'] for r in res['rows']], [0, 3, 6, 9])
    test_close([r['time_s'] for r in res['rows']], [0, 0.3, 0.6, 0.9], eps=1e-6)
    test_close([r['count'] for r in res['rows']], [1, 4, 3, 2], eps=0.03)   # lossy H.264 at its default quality
    test_eq([r['n_points'] for r in res['rows']], [1, 4, 3, 2])
    with open(res['csv']) as f: test_eq([int(r['n_points']) for r in csv.DictReader(f)], [1, 4, 3, 2])
    test_eq(Image.open(res['plot']).size, (700, 300))
    back = list(read_video(res['video']))
    test_eq((len(back), back[0][2].shape), (4, (96, 128, 3)))
    test_close(video_fps(res['video']), 10 / 3, eps=1e-3)
    (d / 'notes.mp4').write_text('not a video')
    test_fail(lambda: predict_video(str(d / 'notes.mp4'), sq, out=str(d / 'out2'), quiet=True),
              contains='notes.mp4: not a readable video')
    assert not (d / 'out2').exists()

# %%
#| hide
import nbdev; nbdev.nbdev_export()
