"""Counting people in the frames of a video (the notebook: nbs/11c_video.py)."""
import numpy as np
from PIL import Image

from uotcrowd.counter import Counter
from uotcrowd.video import SquareCounter, VideoWriter, predict_video, read_video, square_frames


def test_predict_video(tmp_path):
    "A video made here, frame k showing (k mod 4) + 1 white squares: counts per frame, CSV, plot, annotated video."
    import av  # noqa: F401  (the dev extra installs PyAV: a missing one fails here)
    with VideoWriter(tmp_path / 'squares.mp4', 10) as vw:
        for f in square_frames(12): vw.write(f)
    res = predict_video(str(tmp_path / 'squares.mp4'), Counter(SquareCounter(), device='cpu'), out=str(tmp_path / 'out'),
                        every=2, annotate=True, quiet=True)
    expected = [k % 4 + 1 for k in range(0, 12, 2)]
    assert [r['frame'] for r in res['rows']] == list(range(0, 12, 2))
    np.testing.assert_allclose([r['count'] for r in res['rows']], expected, atol=0.03)
    assert [r['n_points'] for r in res['rows']] == expected
    assert res['csv'].read_text().splitlines()[0] == 'frame,time_s,count,n_points'
    assert Image.open(res['plot']).size == (700, 300)
    assert len(list(read_video(res['video']))) == len(expected)

