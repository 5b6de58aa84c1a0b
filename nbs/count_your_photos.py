# %% [markdown]
# # Count people in your photos
#
# > Three ways to count the people in your own photos and videos with a trained model: from Python, from the command line, and on a local web page.

# %% [markdown]
# The repository ships trained models, each with a **card** that says what it is and how well it did. Any of them,
# or any checkpoint you trained with `uotcrowd train`, counts people in a photo in one line. The examples below
# use a ShanghaiTech part B test photo (a street scene, 1024×768) and the default committed model, `shb-effnet-gl`:
# EfficientNet-Lite0 from ImageNet weights, trained on part B with the generalized loss (test MAE 10.7, 40 %
# of MCNN's). `shb-mcnn-gl`, MCNN from scratch, is there too.

# %%
#| hide
from pathlib import Path
import io
import numpy as np
from scipy.io import loadmat
import matplotlib.pyplot as plt
from matplotlib_inline.backend_inline import set_matplotlib_formats

# %%
#| hide
set_matplotlib_formats('jpeg')     # photos: JPEG figures keep this page small
# the part B test photo where the data set is beside the checkout; a part B training photo from the test fixtures elsewhere
photo = Path('../../shared/datasets/ShanghaiTech/part_B/test_data/images/IMG_1.jpg')
if not photo.is_file(): photo = Path('../tests/fixtures/ShanghaiTech/part_B/train_data/images/IMG_9.jpg')
annotated = len(loadmat(str(photo.parent.parent / 'ground-truth' / f'GT_{photo.stem}.mat'))['image_info'][0, 0][0, 0][0])

# %% [markdown]
# ## Which models are there?
#
# `uotcrowd models` on the command line, or `models_cmd()` in Python, lists the committed models by name with the
# main numbers of their cards (test MAE and RMSE on the data set's test split, localization F1 at 8 px, the
# localization threshold chosen on validation images, training epochs and minutes); `uotcrowd models --json-cards`
# prints the full cards.

# %%
from uotcrowd.checkpoints import models_cmd
from uotcrowd.counter import Counter, render_result

# %%
cards = models_cmd()

# %%
cards['shb-effnet-gl']

# %% [markdown]
# ## In Python
#
# `Counter` loads a model once: a name from the list above (`Counter()` is `Counter('shb-effnet-gl')`), or the path
# of a checkpoint. It runs on the GPU when
# there is one (`device='auto'`), in the precision the model was trained in where the hardware computes it natively
# (float32 elsewhere), and locates heads with the threshold
# stored in the model file.

# %%
counter = Counter('shb-effnet-gl')
counter

# %% [markdown]
# Call it on a file path, a PIL image or an `(H, W, 3)` uint8 array. The result holds the count (the sum of the
# density map), the density map itself, the located heads (`points`, `(x, y)` in photo pixels) and the height of
# the density peak at each (`scores`):

# %%
result = counter(photo)
print(result)
print(f'density map {result.density.shape}, first heads {result.points[:3].round(1).tolist()}, '
      f'their scores {[round(float(s), 3) for s in result.scores[:3]]}; the annotation has {annotated} heads')

# %% [markdown]
# `render_result` draws a result on its photo: the density map as a heat map, the located heads as red dots.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.7))
for ax, show, title in zip(axes, ('density', 'points'), (f'density map: count {result.count:.1f} (annotated: {annotated})',
                                                         f'{len(result.points)} located heads')):
    ax.imshow(render_result(photo, result, show=show)); ax.set_title(title); ax.axis('off')
fig.tight_layout()

# %% [markdown]
# The photo has 23 annotated people and the model counts about 22. This EfficientNet-Lite0 started from ImageNet
# weights and was trained for 40 epochs of 512-px crops on one CPU core (about two hours, with the transport of the
# generalized loss solved at every step); its mean absolute error over the 316 part B test photos is 10.7 people
# (its card above), 40 % of that of MCNN trained from scratch (26). Its errors are largest on dense crowds, which it
# still under-counts (by 7 people on average in the densest quarter of the test photos, against 48 for MCNN; see
# [the fixed-protocol study](experiments/shb_study.ipynb)). Any
# better checkpoint is used the same way.
#
# A list of photos is counted in batches (photos of the same size together) and gives a list of results:
# `counter([photo1, photo2, ...])`.
#
# **Large photos** are counted in tiles, automatically above 2.5 megapixels, so memory stays bounded whatever the
# photo's size: the tiles overlap by 128 pixels of context and only each tile's centre is kept, so the stitched map
# is the whole-photo map (exactly for MCNN; within about 1 % in count for VGG19 and EfficientNet-Lite0, whose
# receptive fields are wider: 1.1 % with 256-px tiles and 0.3 % with 512-px ones on this photo). A 4000×3000
# photo through VGG19 on the CPU peaks at a few GB tiled instead of many GB whole (see the numbers in
# [Counter](11a_counter.ipynb#peak-memory-of-a-large-photo)). The tile side can also be set: `Counter(name, tile=512)`,
# or per call:

# %%
tiled = counter(photo, tile=256)
print(f'whole photo: {result.count:.2f}; in {tiled.tiles} tiles of 256 px: {tiled.count:.2f}')
assert abs(tiled.count - result.count) < 0.02 * result.count   # measured: 1.1 %

# %% [markdown]
# **Videos**: `predict_video` counts every N-th frame and writes the counts per frame (CSV), a plot of the count
# over time and, if asked, a video of the counted frames with their density maps, heads and counts. It needs the
# video extra (`pip install -e ".[video]"`: PyAV, which brings its own FFmpeg).
#
# ```python
# from uotcrowd.video import predict_video
# predict_video('clip.mp4', 'shb-effnet-gl', out='counts', every=5, annotate=True)
# # counts/clip_counts.csv, counts/clip_counts.png, counts/clip_annotated.mp4
# ```

# %% [markdown]
# ## On the command line
#
# ```sh
# uotcrowd models                                                    # the committed models and their cards
# uotcrowd predict --checkpoint shb-effnet-gl photo.jpg --out counts   # counts/predictions.csv, points.json, photo_pred.png
# uotcrowd predict --checkpoint shb-effnet-gl holiday/ --out counts    # every photo in a folder
# uotcrowd predict --checkpoint shb-effnet-gl big.jpg --tile 1024 --out counts
# uotcrowd predict --checkpoint shb-effnet-gl clip.mp4 --every 5 --annotate --out counts
# ```
#
# `--checkpoint` takes a model name or the path of a checkpoint written by `uotcrowd train`; `--device`,
# `--precision` and `--loc-threshold` override what the model file says.

# %% [markdown]
# ## On a web page
#
# ```sh
# uotcrowd serve --checkpoint shb-effnet-gl
# ```
#
# starts a small web server on this computer only (http://127.0.0.1:8000/; `--allow-remote` with `--host` serves
# other computers too). Drop a photo on the page, or choose one and press Count: the server counts it and shows the
# count, the density map over the photo and the located heads. It needs the serve extra
# (`pip install -e ".[serve]"`: FastAPI and python-multipart, served by uvicorn). Uploads are limited to 20 MB
# (`--max-upload-mb`), 50 megapixels (`--max-megapixels`) and 30 seconds to arrive (`--upload-timeout`), so a slow
# or stalled client never holds up the others; anything that is not an image is refused with a message. Programs
# can post photos to `/api/count` (a form with the file field `image`, or the raw bytes) and get JSON back; the
# OpenAPI schema of the whole server is at `/openapi.json`:
#
# ```sh
# curl -F image=@photo.jpg http://127.0.0.1:8000/api/count
# ```
#
# Below, the page after uploading the photo above, as headless Chromium shows it:

# %%
#| hide
import shutil, subprocess, tempfile, urllib.request, secrets
from uotcrowd.serve import make_server
from IPython.display import Image as Picture
from PIL import Image as PILImage

# %%
#| notest
exe = shutil.which('chromium') or shutil.which('chromium-browser')
if exe is None: print('chromium is not installed here: no screenshot')
else:
    with make_server(counter, port=0, quiet=True) as srv:     # serves in a thread until the block ends
        b = secrets.token_hex(8)
        body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{photo.name}"\r\n\r\n').encode() \
            + photo.read_bytes() + f'\r\n--{b}--\r\n'.encode()
        req = urllib.request.Request(srv.url + 'count', data=body, headers={'Content-Type': f'multipart/form-data; boundary={b}'})
        with urllib.request.urlopen(req, timeout=120) as resp: page_url = resp.geturl()
        with tempfile.TemporaryDirectory() as d:
            shot = Path(d) / 'page.png'
            subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-sync',
                            '--disable-background-networking', '--disable-component-update', f'--user-data-dir={d}/profile',
                            '--window-size=1150,760', '--hide-scrollbars', '--virtual-time-budget=5000', f'--screenshot={shot}', page_url],
                           check=True, capture_output=True, timeout=180)
            jpg = io.BytesIO(); PILImage.open(shot).convert('RGB').save(jpg, 'JPEG', quality=80)
            display(Picture(data=jpg.getvalue(), format='jpeg', width=860))

# %% [markdown]
# ## Elsewhere: ONNX
#
# To count outside Python's PyTorch (a C++ or C# service, a phone, a browser), export the model to ONNX. The file
# takes images of any size and carries the model card in its metadata; the export checks that onnxruntime's density
# map equals PyTorch's. `Counter`, `uotcrowd predict` and `uotcrowd serve` run such a file with onnxruntime on the
# CPU, in float32 (the onnx extra: `pip install -e ".[onnx]"`):
#
# ```sh
# uotcrowd export --checkpoint shb-mcnn-gl --format onnx          # writes shb-mcnn-gl.onnx
# uotcrowd serve --checkpoint shb-mcnn-gl.onnx
# ```
#
# ```python
# counter = Counter('shb-mcnn-gl.onnx')
# ```
#
# The graph's input is a float32 batch `(B, 3, H, W)` of RGB images scaled to [0, 1] and normalized with the
# ImageNet mean and standard deviation; its output the density map, whose sum is the count. See
# [ONNX export](10a_deploy.ipynb) for the details and `uotcrowd bench` for its speed against PyTorch.
