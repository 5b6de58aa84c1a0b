# %% [markdown]
# # Web page
#
# > `uotcrowd serve`: a local web page where a person drops a photo and sees the count, the density overlay and the located heads, with a JSON API described by its OpenAPI schema.

# %%
#| default_exp serve

# %%
#| export
import html, io, ipaddress, json, secrets, socket, struct, threading, time, warnings, zlib
from collections import OrderedDict
import numpy as np
from PIL import Image
from uotcrowd import __version__
from uotcrowd.counter import Counter, as_rgb, render_result, DEFAULT_MODEL
from uotcrowd.precision import Precision

# %%
#| hide
import urllib.request, urllib.error
import torch
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.models import get_model

# %% [markdown]
# The page is an ASGI application (FastAPI, with python-multipart reading the uploads) served by uvicorn: the `serve`
# extra, `pip install -e ".[serve]"` (also in `dev`). One `Counter` is loaded when the server starts. It listens on
# this computer only (127.0.0.1) unless told otherwise (`allow_remote`): photos never leave it.
#
# | request | answer |
# |---|---|
# | `GET /` | the upload page (drop a photo, or choose one and press Count) |
# | `POST /count` (form field `image`) | `303` to `/result/ID`, or the page with the error |
# | `GET /result/ID` | the page with the count, the density overlay and the located heads |
# | `GET /result/ID/density.png`, `/result/ID/points.png` | the pictures, rendered by the server |
# | `POST /api/count` (a form with `image`, or the raw image bytes) | JSON: count, points, picture links; errors as `{"error": ...}` |
# | `GET /openapi.json` | the OpenAPI schema of all of the above |
#
# **Limits**, each refusal a message saying what was wrong: an upload larger than `max_upload_mb` (20 MB) is
# refused (413) from its `Content-Length` before it is read, or as soon as it grows past the limit; one that has not
# arrived within `upload_timeout` seconds (30) is refused (408) and its connection closed; an image with more than
# `max_megapixels` (50) is refused from its header, before it is decoded (a decompression bomb costs nothing);
# anything that is not a readable image is refused (400). Unknown pages are 404, a wrong method 405.
#
# **Many clients at once.** The event loop only moves bytes: each request's body is read in full (within the two
# limits) before the application sees it, so a slow or stalled upload holds its own connection and nobody else's.
# Decoding, counting and drawing run in a worker thread, one photo at a time, so requests that arrive together
# wait their turn without blocking the loop, and the memory is that of one photo. At most `max_uploads` (16)
# uploads are received or waiting at once and at most `max_connections` (64) connections served; more are answered
# 503. Results are kept in memory for the last `keep` photos (16),
# so a result page can be reloaded.

# %% [markdown]
# ## Reading an upload
#
# python-multipart splits a browser's form into its fields; `decode_upload` turns the file's bytes into an RGB array
# or says what is wrong with them. The pixel count is read from the header, before anything is decoded.

# %%
#| export
class UploadError(ValueError):
    "An upload the server refuses; `status` is the HTTP status to answer with."
    def __init__(self, status:int, message:str):
        super().__init__(message)
        self.status = status


# %%
_e = UploadError(413, 'the upload is too large')
test_eq((_e.status, str(_e), isinstance(_e, ValueError)), (413, 'the upload is too large', True))


# %%
#| export
def decode_upload(data:bytes, # the uploaded file
                  filename:str|None=None, # its name, for messages
                  max_pixels:int=50_000_000 # refuse larger images (checked from the header, before decoding)
                 ) -> np.ndarray: # `(H, W, 3)` uint8
    "An uploaded image as an RGB array; `UploadError` (400) says why anything else is refused."
    name = filename or 'the upload'
    if not data: raise UploadError(400, f"{name} is empty: choose a photo to upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)   # the pixel limit below decides
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UploadError(400, f"{name} has too many pixels (more than PIL ever decodes)") from None
    except Exception:
        raise UploadError(400, f"{name} is not an image: upload a photo "
                               f"(JPEG, PNG, WebP, BMP, TIFF or GIF)") from None
    if im.width * im.height > max_pixels:
        raise UploadError(400, f"{name} is {im.width}×{im.height} = {im.width * im.height / 1e6:.1f} "
                               f"megapixels; the limit is {max_pixels / 1e6:g} megapixels")
    try: im.load()
    except Exception as e:
        raise UploadError(400, f"{name} is a corrupt or truncated {im.format} image ({e})") from None
    return as_rgb(im)


# %%
png = io.BytesIO()
Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(png, 'PNG')
png = png.getvalue()
test_eq(decode_upload(png, 'a.png'), np.full((6, 8, 3), 200, np.uint8))
test_fail(lambda: decode_upload(b'%PDF-1.4 not a photo', 'scan.pdf'), contains='scan.pdf is not an image')
test_fail(lambda: decode_upload(b'', 'x.jpg'), contains='x.jpg is empty')
test_fail(lambda: decode_upload(png, 'a.png', max_pixels=40),
          contains='a.png is 8×6 = 0.0 megapixels; the limit is 4e-05')
noisy = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy, 'PNG')
test_fail(lambda: decode_upload(noisy.getvalue()[:3000], 'cut.png'),
          contains='cut.png is a corrupt or truncated PNG image')


# %% [markdown]
# A decompression bomb is a small file that declares a huge image: `png_bomb` writes one, a grey PNG of zeros
# compressed row by row (20 000×20 000 pixels fit in a 400 kB file), without ever holding the image in memory.

# %%
#| export
def png_bomb(width:int, # declared width
             height:int # declared height
            ) -> bytes: # a valid grey PNG of zeros
    "A valid PNG of `width`×`height` black pixels, compressed row by row (a decompression bomb for tests)."
    def chunk(kind:bytes, data:bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    z, parts, row = zlib.compressobj(9), [], bytes(width + 1)       # filter byte 0, then `width` grey zeros
    for _ in range(height): parts.append(z.compress(row))
    parts.append(z.flush())
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', b''.join(parts)) + chunk(b'IEND', b''))


# %%
bomb = png_bomb(8000, 7000)
assert len(bomb) < 100_000
# a real image, once decoded
test_eq(Image.open(io.BytesIO(png_bomb(5, 3))).convert('L').getextrema(), (0, 0))
test_fail(lambda: decode_upload(bomb, 'bomb.png'),
          contains='bomb.png is 8000×7000 = 56.0 megapixels; the limit is 50 megapixels')


# %% [markdown]
# ## The page
#
# One HTML page, without external resources: the upload form (a drop zone that sends a photo as soon as it is
# dropped; a photo chosen with the file picker is sent by Count; the size limit is also checked in the browser),
# then, for a result, the count in large type, the numbers behind it, and the two pictures. Error messages are shown
# in the same page.

# %%
#| export
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} .model{color:#555;margin:0 0 16px}
#drop{display:block;border:3px dashed #8a94a6;border-radius:12px;padding:36px;text-align:center;
  background:#fff;cursor:pointer;font-size:1.1rem}
#drop.over{border-color:#1f6feb;background:#eef4ff} #image{margin-top:8px}
button{font-size:1rem;padding:6px 16px;margin-left:8px}
.error{background:#fde8e8;border:2px solid #c81e1e;color:#7f1d1d;border-radius:8px;padding:12px 16px;
  margin:16px 0;font-size:1.05rem}
#count{display:inline-block;background:#c81e5b;color:#fff;font-size:2.6rem;font-weight:700;border-radius:12px;
  padding:10px 24px;margin:20px 0 6px}
.facts{color:#333;margin:4px 0 16px} .pics{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;flex:1 1 420px} figure img{width:100%;border-radius:6px;display:block}
figcaption{color:#555;margin-top:4px}
footer{color:#777;margin-top:24px;font-size:.9rem}
"""

# %%
#| export
_JS = """
const form = document.getElementById('upload'), input = document.getElementById('image'),
  drop = document.getElementById('drop');
const limit = Number(form.dataset.maxBytes), status = document.getElementById('status');
function send() {
  if (!input.files.length) { status.textContent = 'choose a photo first'; return; }
  const photo = input.files[0];
  if (photo.size > limit) {
    status.textContent = photo.name + ' is larger than the ' + form.dataset.maxMb + ' MB limit'; return;
  }
  status.textContent = 'counting ' + photo.name + '...'; form.submit();
}
input.addEventListener('change', () => {
  if (input.files.length) status.textContent = input.files[0].name + ': press Count';
});
form.addEventListener('submit', ev => { ev.preventDefault(); send(); });
['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, ev => {
  ev.preventDefault(); drop.classList.add('over');
}));
['dragleave', 'drop'].forEach(t => drop.addEventListener(t, ev => {
  ev.preventDefault(); drop.classList.remove('over');
}));
drop.addEventListener('drop', ev => {
  if (ev.dataTransfer.files.length) { input.files = ev.dataTransfer.files; send(); }
});
"""


# %%
#| export
def _model_line(counter:Counter) -> str:
    c = counter.card or {}
    arch, loss, data = ((c.get('architecture') or {}).get('model'), (c.get('loss') or {}).get('name'),
                        c.get('dataset'))
    test = c.get('test') or {}
    what = f": {arch} trained with the {loss} loss on {data}" if arch and loss and data else ''
    mae = f"; test MAE {test['mae']:.1f}, RMSE {test['rmse']:.1f}" if 'mae' in test and 'rmse' in test else ''
    return f"Model <b>{html.escape(counter.name)}</b>{html.escape(what)}{mae}. Photos stay on this computer."


# %% [markdown]
# The line about the model comes from its card (here a stand-in with a name and a card):

# %%
class _Named:
    name = 'shb-x'
    card = {'architecture': {'model': 'mcnn'}, 'loss': {'name': 'gl'}, 'dataset': 'shanghaitech-b',
            'test': {'mae': 11.04, 'rmse': 19.5}}
test_eq(_model_line(_Named()), 'Model <b>shb-x</b>: mcnn trained with the gl loss on shanghaitech-b; '
                               'test MAE 11.0, RMSE 19.5. Photos stay on this computer.')
_Named.card = None
test_eq(_model_line(_Named()), 'Model <b>shb-x</b>. Photos stay on this computer.')


# %%
#| export
def render_page(counter:Counter, # the server's counter (its name and card are shown)
                max_upload_mb:float=20, # shown, and checked in the browser
                result:dict|None=None, # a stored result (`CountingService.results` value) to show
                error:str|None=None # a message to show instead
               ) -> str:
    "The HTML of the upload page, with a result or an error."
    max_bytes = int(max_upload_mb * 2**20)
    parts = [f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width,initial-scale=1">'
             f'<title>uotcrowd: count people in a photo</title>'
             f'<style>{_CSS}</style></head><body><main><h1>Count people in a photo</h1>'
             f'<p class="model">{_model_line(counter)}</p>'
             f'<form id="upload" method="post" action="/count" enctype="multipart/form-data" '
             f'data-max-bytes="{max_bytes}" data-max-mb="{max_upload_mb:g}">'
             f'<label id="drop" for="image">Drop a photo here, or click to choose one<br>'
             f'<small>JPEG, PNG, WebP, BMP, TIFF; up to {max_upload_mb:g} MB</small></label>'
             f'<input id="image" type="file" name="image" accept="image/*">'
             f'<button type="submit">Count</button> <span id="status"></span></form>']
    if error: parts.append(f'<p class="error" id="error">{html.escape(error)}</p>')
    if result:
        rid, r = result['id'], result['result']
        name = html.escape(result['name'] or 'photo')
        tiles = f" · counted in {r.tiles} tiles" if r.tiles > 1 else ''
        parts.append(f'<section id="result">'
                     f'<div id="count" data-count="{r.count:.2f}">{r.count:.0f} people</div>'
                     f'<p class="facts">{name}: {r.width}×{r.height} px · density sum {r.count:.2f} · '
                     f'{len(r.points)} located heads{tiles} · {result["seconds"]:.1f} s</p><div class="pics">'
                     f'<figure><img src="/result/{rid}/density.png" alt="density map of {name}">'
                     f'<figcaption>density map (sum = count)</figcaption></figure>'
                     f'<figure><img src="/result/{rid}/points.png" alt="located heads in {name}">'
                     f'<figcaption>{len(r.points)} located heads '
                     f'(density peaks above {counter.loc_threshold:g})</figcaption></figure></div></section>')
    parts.append(f'<footer>Programs can post photos to <code>/api/count</code>; its schema is '
                 f'<a href="/openapi.json">/openapi.json</a>.</footer>'
                 f'<script>{_JS}</script></main></body></html>')
    return ''.join(parts)


# %% [markdown]
# ## What the server holds
#
# `CountingService` holds the counter, the limits and the recent results. `count` is the work of one photo, done in
# the worker thread: decode (or refuse), count, draw the two pictures, keep the result.

# %%
#| export
class CountingService:
    """One `Counter`, the upload limits and the results of the last `keep` photos: what the web app serves
    with."""
    def __init__(self, counter:Counter, # the model, loaded once
                 max_upload_mb:float=20, # larger uploads are refused (413)
                 max_megapixels:float=50, # larger images are refused (400) before they are decoded
                 keep:int=16, # results kept for their pages
                 upload_timeout:float=30, # seconds an upload may take to arrive (then 408)
                 max_uploads:int=16 # uploads received or counted at once (more are answered 503)
                ):
        if max_upload_mb <= 0: raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
        if max_megapixels <= 0: raise ValueError(f"max_megapixels must be positive, got {max_megapixels}")
        if upload_timeout <= 0: raise ValueError(f"upload_timeout must be positive, got {upload_timeout}")
        self.counter, self.max_upload_mb = counter, max_upload_mb
        self.keep, self.upload_timeout = max(1, keep), upload_timeout
        # `uploads` in progress: counted by the event loop only
        self.max_uploads, self.uploads = max(1, int(max_uploads)), 0
        self.max_upload_bytes, self.max_pixels = int(max_upload_mb * 2**20), int(max_megapixels * 1e6)
        self.results:OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()   # results are written by the worker thread and read by the event loop

    def page(self, **kw) -> str: return render_page(self.counter, self.max_upload_mb, **kw)

    def too_large(self, size:int|None=None) -> str:
        "The message of a 413."
        what = f"the upload is {size / 2**20:.1f} MB" if size else "the upload is larger than the limit"
        return f"{what}; the limit is {self.max_upload_mb:g} MB"

    def count(self, data:bytes, # the uploaded file
              name:str|None=None # its name
             ) -> dict:
        """Decode (`UploadError` if refused), count and draw one upload, and keep the result; returns the
        stored result."""
        rgb = decode_upload(data, name, self.max_pixels)
        t = time.perf_counter()
        r = self.counter(rgb)
        secs = time.perf_counter() - t
        pngs = {}
        for show in ('density', 'points'):
            buf = io.BytesIO()
            render_result(rgb, r, show=show, max_side=1280).save(buf, 'PNG')
            pngs[show] = buf.getvalue()
        stored = {'id': secrets.token_hex(8), 'name': name, 'result': r, 'seconds': secs, 'png': pngs}
        with self._lock:
            self.results[stored['id']] = stored
            while len(self.results) > self.keep: self.results.popitem(last=False)
        return stored

    def result(self, rid:str) -> dict|None:
        with self._lock: return self.results.get(rid)

    @staticmethod
    def answer(stored:dict) -> dict:
        "The JSON answer of `/api/count` for a stored result."
        rid = stored['id']
        return {'id': rid, 'name': stored['name'], **stored['result'].to_dict(),
                'seconds': round(stored['seconds'], 3), 'page': f'/result/{rid}',
                'density_png': f'/result/{rid}/density.png', 'points_png': f'/result/{rid}/points.png'}


# %% [markdown]
# A counter with random MCNN weights and a small photo (blocks of colour: a small PNG) serve the tests from here
# on. The service counts it as the counter does, refuses what `decode_upload` refuses, and keeps the last `keep`
# results:

# %%
torch.manual_seed(0)
photo = np.kron(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8),
                np.ones((10, 10, 1), np.uint8))
photo_png = io.BytesIO()
Image.fromarray(photo).save(photo_png, 'PNG')
photo_png = photo_png.getvalue()
assert len(photo_png) < 0.05 * 2**20
counter = Counter(get_model('mcnn').eval(), device='cpu')
expected = counter(photo)

# %%
service = CountingService(counter, max_upload_mb=0.05, keep=2)
test_eq((service.max_upload_bytes, service.max_pixels), (int(0.05 * 2**20), 50_000_000))
test_eq(service.too_large(60_000), 'the upload is 0.1 MB; the limit is 0.05 MB')
test_eq(service.too_large(), 'the upload is larger than the limit; the limit is 0.05 MB')
first = service.count(photo_png, 'crowd.png')
test_close(first['result'].count, expected.count, eps=1e-4)
test_eq(sorted(first['png']), ['density', 'points'])
test_eq(service.answer(first)['points_png'], f"/result/{first['id']}/points.png")
for _ in range(2): service.count(photo_png, 'crowd.png')
test_eq((service.result(first['id']), len(service.results)), (None, 2))   # only the last `keep` are kept
test_fail(lambda: service.count(b'%PDF-1.4', 'a.pdf'), contains='a.pdf is not an image')
test_fail(lambda: CountingService(counter, upload_timeout=0), contains='upload_timeout must be positive')


# %% [markdown]
# ## Reading bodies within limits
#
# `UploadLimits` wraps the application (plain ASGI, in front of everything else). It reads the whole body of each
# request before the application sees it, under the two limits: a `Content-Length` above the size limit is refused
# at once, and so is a body that grows past it; a body that has not arrived within the time limit is refused with
# 408 and its connection closed, whatever else the server is doing. A client that goes away while sending just
# ends its request. A refused upload is still read to its end (up to four times the limit, within the time
# limit) and thrown away, so that a client that sends its whole body before reading the answer reads it
# instead of a reset connection; one that asked `Expect: 100-continue` never sends it. An upload beyond the
# `max_uploads` in progress (being received or waiting for the model) is answered 503 at once. Every answer says
# `Cache-Control: no-store` and `X-Content-Type-Options: nosniff`.

# %%
#| export
_HEADERS = [(b'cache-control', b'no-store'), (b'x-content-type-options', b'nosniff')]


# %%
#| export
class UploadLimits:
    """ASGI middleware: each request's body is read in full before the app runs, within a size limit (413) and
    a time limit (408)."""
    def __init__(self, app, # the ASGI application
                 service:CountingService # its limits, and the page errors are shown in
                ): self.app, self.service = app, service

    def _error(self, path:str, status:int, message:str) -> tuple[bytes, bytes]:
        "Content type and body of a refusal: JSON under `/api/`, the page with the message elsewhere."
        if path.startswith('/api/'): return b'application/json', json.dumps({'error': message}).encode()
        return b'text/html; charset=utf-8', self.service.page(error=message).encode()

    async def _refuse(self, scope, receive, send, status:int, message:str, drain:bool=False):
        import anyio
        ctype, body = self._error(scope['path'], status, message)
        await send({'type': 'http.response.start', 'status': status, 'headers': [
            (b'content-type', ctype), (b'content-length', str(len(body)).encode()),
            (b'connection', b'close')]})
        await send({'type': 'http.response.body', 'body': body, 'more_body': drain})
        if not drain: return
        with anyio.move_on_after(self.service.upload_timeout):   # read and drop the rest of the body
            seen = 0
            while seen <= 4 * self.service.max_upload_bytes:
                message = await receive()
                if message['type'] != 'http.request': break
                seen += len(message.get('body', b''))
                if not message.get('more_body', False): break
        await send({'type': 'http.response.body', 'body': b''})

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http': return await self.app(scope, receive, send)
        async def send_with_headers(message):
            if message['type'] == 'http.response.start':
                message = {**message, 'headers': [*message.get('headers', []), *_HEADERS]}
            await send(message)
        s, headers = self.service, {k.lower(): v for k, v in scope['headers']}
        length = headers.get(b'content-length', b'')
        # no body to wait for
        if not ((length.isdigit() and int(length) > 0) or b'transfer-encoding' in headers):
            return await self._run(scope, receive, send_with_headers, headers, length)
        if s.uploads >= s.max_uploads:
            return await self._refuse(scope, receive, send_with_headers, 503,
                                      f"the server is busy with {s.uploads} uploads "
                                      f"(at most {s.max_uploads} at once): try again in a moment")
        s.uploads += 1
        try: return await self._run(scope, receive, send_with_headers, headers, length)
        finally: s.uploads -= 1

    async def _run(self, scope, receive, send_with_headers, headers:dict, length:bytes):
        "Read the body within the limits, then run the app on it."
        import anyio
        s = self.service
        # the client waits for our go before sending
        may_drain = b'100-continue' not in headers.get(b'expect', b'').lower()
        if length.isdigit() and int(length) > s.max_upload_bytes:
            return await self._refuse(scope, receive, send_with_headers, 413, s.too_large(int(length)),
                                      drain=may_drain)
        chunks, size, complete = [], 0, False
        with anyio.move_on_after(s.upload_timeout):
            while not complete:
                message = await receive()
                if message['type'] == 'http.disconnect': return   # the client went away: nobody to answer
                chunk = message.get('body', b'')
                size += len(chunk)
                if size > s.max_upload_bytes:
                    return await self._refuse(scope, receive, send_with_headers, 413, s.too_large(),
                                              drain=may_drain)
                chunks.append(chunk)
                complete = not message.get('more_body', False)
        if not complete:
            return await self._refuse(scope, receive, send_with_headers, 408,
                                      f"the upload did not arrive within {s.upload_timeout:g} s "
                                      f"({size / 2**20:.2f} MB received): the connection was too slow "
                                      f"or stalled; try again")
        body, replayed = b''.join(chunks), False
        async def replay():
            nonlocal replayed
            if replayed: return await receive()   # after the body: the client's disconnect
            replayed = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        await self.app(scope, replay, send_with_headers)


# %% [markdown]
# ## The application
#
# `make_app` is the FastAPI application: the routes of the table above, answers described by their models (so the
# OpenAPI schema says what `/api/count` returns and refuses), and every error, the framework's own included (an
# unknown page, a wrong method, a form that cannot be parsed or lacks its field), turned into the page with the
# message or, under `/api/`, `{"error": message}`. The interactive documentation pages are left out: they load
# scripts from the internet. The work of a photo runs in a worker thread, one photo at a time
# (`anyio.to_thread.run_sync` with a capacity limiter of 1).

# %%
#| export
def _serve_extra():
    "The modules of the `serve` extra, or an error that says how to install them."
    try:
        import anyio, fastapi, pydantic, python_multipart, uvicorn
        return anyio, fastapi, pydantic
    except ImportError as e:
        raise ImportError(f"uotcrowd serve needs the serve extra: pip install -e \".[serve]\" "
                          f"(or uotcrowd[serve]); {e}") from None


# %%
test_eq([m.__name__ for m in _serve_extra()], ['anyio', 'fastapi', 'pydantic'])


# %%
#| export
def make_app(service:CountingService # the counter, limits and results
            ):
    "The ASGI application of the page and the API (FastAPI), wrapped in `UploadLimits`."
    anyio, fastapi, pydantic = _serve_extra()
    from fastapi import Header, Path, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException

    class Error(pydantic.BaseModel):
        error:str                              # what was wrong, in a sentence

    class Counted(pydantic.BaseModel):
        id:str                                 # the result's id (its page is /result/ID)
        name:str|None                          # the uploaded file's name
        source:str|None                        # always null for uploads
        count:float                            # people: the sum of the density map
        n_points:int                           # located heads
        width:int                              # image width in pixels
        height:int                             # image height in pixels
        tiles:int                              # tiles the photo was counted in
        points:list[list[float]]               # located heads, (x, y) in pixels
        scores:list[float]                     # density at each located head
        seconds:float                          # time the model took
        page:str                               # the result page
        density_png:str                        # the density picture
        points_png:str                         # the located heads picture

    limits = f"at most {service.max_upload_mb:g} MB and {service.max_pixels / 1e6:g} megapixels"
    refusals = {400: {'model': Error,
                      'description': 'not an image, a corrupt image, too many pixels, or no `image` field'},
                408: {'model': Error,
                      'description': f'the upload did not arrive within {service.upload_timeout:g} s'},
                413: {'model': Error, 'description': f'larger than {service.max_upload_mb:g} MB'}}
    app = fastapi.FastAPI(title='uotcrowd serve', version=__version__, docs_url=None, redoc_url=None,
                          description=f"Count the people in a photo with the model {service.counter.name}. "
                                      f"Photos {limits}.")
    model_limiter = None

    async def count(data:bytes, name:str|None) -> dict:
        nonlocal model_limiter
        # made in the event loop that uses it
        if model_limiter is None: model_limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(service.count, data, name, limiter=model_limiter)

    def refusal(request:Request, status:int, message:str):
        if request.url.path.startswith('/api/'): return JSONResponse({'error': message}, status)
        return HTMLResponse(service.page(error=message), status)

    @app.exception_handler(HTTPException)
    async def http_error(request:Request, exc:HTTPException):
        path = request.url.path
        if exc.status_code == 404 and exc.detail in ('Not Found', None): message = f"{path}: no such page"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get('Allow', '')
            message = f"{request.method} is not answered at {path}" + (f": use {allowed}" if allowed else '')
        else: message = str(exc.detail)
        response = refusal(request, exc.status_code, message)
        if exc.headers: response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request:Request, exc:RequestValidationError):
        errors = exc.errors()
        if any(tuple(e.get('loc', ()))[:1] == ('path',) for e in errors):
            return refusal(request, 404,
                           f"{request.url.path}: no such result (result ids are 16 hexadecimal digits)")
        return refusal(request, 400, 'the request is not what this page takes: '
                       + '; '.join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors))

    async def upload(request:Request, raw:bool, name:str|None=None) -> tuple[bytes, str|None]:
        """The photo's bytes and name: the file field `image` of a form, or (where `raw`) the whole body,
        named `name`."""
        ctype = request.headers.get('content-type', '').lower()
        if ctype.startswith(('multipart/form-data', 'application/x-www-form-urlencoded')):
            try: form = await request.form(max_files=4, max_fields=16)
            except Exception as e:       # python-multipart's own message, as the framework passes it on
                detail = str(getattr(e, 'detail', e)).rstrip('.')
                raise UploadError(400, f"the request body could not be read as a form with a file field "
                                       f"named 'image' ({detail})") from None
            try:
                image = form.get('image')
                if image is None: raise UploadError(400, "the form has no file field named 'image'")
                if isinstance(image, str):
                    raise UploadError(400, "the form field 'image' must be a file: upload a photo")
                return await image.read(), image.filename
            finally: await form.close()
        if not raw:
            raise UploadError(400, "send the photo as a form (multipart/form-data) with a file field named "
                                   "'image'")
        return await request.body(), name

    photo_field = {'type': 'string', 'format': 'binary', 'description': f'the photo, {limits}'}
    form_body = {'multipart/form-data': {'schema': {'type': 'object', 'required': ['image'],
                                                    'properties': {'image': photo_field}}}}
    raw_body = {'application/octet-stream': {'schema': photo_field}}

    @app.get('/', response_class=HTMLResponse, summary='The upload page')
    async def upload_page(): return HTMLResponse(service.page())

    page_refusals = {k: {'description': f"the page with the message: {v['description']}",
                         'content': {'text/html': {}}}
                     for k, v in refusals.items()}
    @app.post('/count', response_class=RedirectResponse, status_code=303, responses=page_refusals,
              openapi_extra={'requestBody': {'required': True, 'content': form_body}},
              summary="Count a photo sent by the page's form; 303 to its result page")
    async def count_form(request:Request):
        try: stored = await count(*await upload(request, raw=False))
        except UploadError as e: return HTMLResponse(service.page(error=str(e)), e.status)
        return RedirectResponse(f"/result/{stored['id']}", status_code=303)

    @app.post('/api/count', response_model=Counted, responses=refusals,
              openapi_extra={'requestBody': {'required': True, 'content': {**form_body, **raw_body}}},
              summary='Count a photo: a form with the file field `image`, or the raw image bytes '
                      '(name in `X-Filename`)')
    async def api_count(request:Request, x_filename:str|None=Header(
                            None, description='the name of a photo sent as raw bytes')):
        try: stored = await count(*await upload(request, raw=True, name=x_filename))
        except UploadError as e: return JSONResponse({'error': str(e)}, e.status)
        return service.answer(stored)

    not_found = {404: {'description': 'the page with the message: no such result',
                       'content': {'text/html': {}}}}
    RID = Path(pattern='^[0-9a-f]{16}$', description='the result id (16 hexadecimal digits)')
    def stored_or_404(rid:str) -> dict:
        stored = service.result(rid)
        if stored is None:
            raise HTTPException(404, f"/result/{rid}: no such result "
                                     f"(results are kept for the last {service.keep} photos)")
        return stored

    @app.get('/result/{rid}', response_class=HTMLResponse, summary='The result page of a counted photo',
             responses=not_found)
    async def result_page(rid:str=RID): return HTMLResponse(service.page(result=stored_or_404(rid)))

    png = {200: {'content': {'image/png': {}}, 'description': 'a PNG'}, **not_found}
    @app.get('/result/{rid}/density.png', response_class=Response, responses=png,
             summary='The density map over the photo')
    async def density_png(rid:str=RID):
        return Response(stored_or_404(rid)['png']['density'], media_type='image/png')

    @app.get('/result/{rid}/points.png', response_class=Response, responses=png,
             summary='The located heads on the photo')
    async def points_png(rid:str=RID):
        return Response(stored_or_404(rid)['png']['points'], media_type='image/png')

    return UploadLimits(app, service)


# %% [markdown]
# ## The server
#
# `CountingServer` serves the application with uvicorn on a socket it binds at once (port 0 picks a free port, and
# `url` is known before serving starts): in the foreground with `serve_forever`, or in a thread with
# `start`/`stop` (or `with`). It listens on a loopback address (127.0.0.1, another 127.x, ::1) unless
# `allow_remote` says otherwise. `make_server` builds one for a checkpoint, named model, ONNX file or `Counter`;
# `serve` is `uotcrowd serve`.

# %%
#| export
def listen_address(host:str, # an IP address, or 'localhost'
                   allow_remote:bool=False # accept addresses other computers reach
                  ) -> str:
    "The address to bind for `host`; a non-loopback one only with `allow_remote`."
    addr = '127.0.0.1' if host == 'localhost' else host
    try: ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address of this computer "
                         f"(127.0.0.1 serves this computer only)") from None
    if not (ip.is_loopback or allow_remote):
        raise ValueError(f"the server listens on this computer only (127.0.0.1, another 127.x address or "
                         f"::1); {host!r} is not one. "
                         f"To serve other computers too, pass allow_remote=True (`--allow-remote`)")
    return addr


# %%
test_eq(listen_address('localhost'), '127.0.0.1')
test_eq(listen_address('::1'), '::1')
test_eq(listen_address('0.0.0.0', allow_remote=True), '0.0.0.0')


# %%
#| export
class CountingServer:
    """The web app served by uvicorn on a socket bound at once: `serve_forever()`, or `start()`/`stop()` in a
    thread (`with`)."""
    def __init__(self, service:CountingService, # the counter, limits and results
                 host:str='127.0.0.1', # a loopback address, unless `allow_remote`
                 port:int=8000, # 0 picks a free port
                 allow_remote:bool=False, # let `host` be an address other computers reach
                 max_connections:int=64, # connections served at once (more are answered 503)
                 quiet:bool=False # no request log
                ):
        _serve_extra()
        import uvicorn
        addr = listen_address(host, allow_remote)
        self.service, self.counter = service, service.counter
        self.socket = socket.create_server((addr, port),
                                           family=socket.AF_INET6 if ':' in addr else socket.AF_INET)
        self.app = make_app(service)
        log = ({'log_config': None, 'log_level': 'warning', 'access_log': False} if quiet
               else {'log_level': 'info'})
        self.server = uvicorn.Server(uvicorn.Config(self.app, lifespan='off', timeout_keep_alive=5,
                                                    timeout_graceful_shutdown=5,
                                                    limit_concurrency=max_connections, server_header=False,
                                                    **log))
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def serve_forever(self):
        "Serve in this thread until interrupted (Ctrl-C) or `stop`."
        self.server.run(sockets=[self.socket])

    def start(self, timeout:float=60 # seconds to wait for the server to accept connections
             ) -> 'CountingServer':
        "Serve in a background thread; returns once the server accepts connections."
        self._thread = threading.Thread(target=self.serve_forever, name='uotcrowd-serve', daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server at {self.url} stopped while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {self.url} did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout:float=30 # seconds to wait for the requests in progress
            ):
        "Stop serving (the requests in progress are finished first) and close the socket."
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.socket.close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()


# %% [markdown]
# `CountingServer` and `make_server` are tested end to end below.

# %%
#| export
def make_server(checkpoint:str|Counter, # checkpoint file, named model, ONNX file, or a `Counter`
                host:str='127.0.0.1', port:int=8000, max_upload_mb:float=20, max_megapixels:float=50,
                keep:int=16, upload_timeout:float=30, max_uploads:int=16, allow_remote:bool=False,
                max_connections:int=64, quiet:bool=False,
                **counter_kwargs # passed to `Counter` (`device`, `precision`, `loc_threshold`, `tile`)
               ) -> CountingServer:
    "A `CountingServer` for `checkpoint`, bound but not yet serving."
    counter = checkpoint if isinstance(checkpoint, Counter) else Counter(checkpoint, **counter_kwargs)
    service = CountingService(counter, max_upload_mb, max_megapixels, keep, upload_timeout, max_uploads)
    return CountingServer(service, host, port, allow_remote, max_connections, quiet)


# %%
#| export
def serve(
          # checkpoint file, named model (`uotcrowd models`) or ONNX file (`uotcrowd export`)
          checkpoint:str=DEFAULT_MODEL,
          # address to listen on (loopback: the page is reachable from this computer only)
          host:str='127.0.0.1',
          port:int=8000, # port (0: any free port)
          allow_remote:bool=False, # allow a --host that other computers reach (the page is then theirs too)
          max_upload_mb:float=20, # largest upload accepted, in MB
          max_megapixels:float=50, # largest image accepted, in megapixels
          upload_timeout:float=30, # seconds an upload may take to arrive
          device:str='auto', # 'auto', 'cpu', 'cuda', 'mps'
          precision:Precision|None=None, # default: the checkpoint's
          loc_threshold:float|None=None, # default: the checkpoint's
          tile:int|None=None, # tile side for large photos (None automatic, 0 never)
          open_browser:bool=False, # open the page in the default browser
          quiet:bool=False # no request log
         ):
    ("Serve a local web page where a person drops a photo and sees the count, the density overlay and the "
     "located heads.")
    srv = make_server(checkpoint, host, port, max_upload_mb, max_megapixels, upload_timeout=upload_timeout,
                      allow_remote=allow_remote, quiet=quiet, device=device, precision=precision,
                      loc_threshold=loc_threshold, tile=tile)
    print(f"uotcrowd serve: counting with {srv.counter.name} ({srv.counter.device}) at {srv.url}  "
          f"(Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser
        threading.Timer(1.0, webbrowser.open, [srv.url]).start()
    try: srv.serve_forever()
    finally: srv.socket.close()


# %% [markdown]
# ## End to end
#
# A server on a free port in a thread, with random MCNN weights: the page, a photo posted as a browser posts it
# (followed to its result page, whose count is the counter's), the pictures, the API and its schema, and the
# refusals: a file that is not an image, an upload over the size limit, an image over the pixel limit, a form
# without the field, an unknown page, a wrong method, and a server asked to listen beyond this computer.
# `tests/test_serve.py` checks the server under stalled, concurrent and vanishing clients, fuzzes the API from its
# schema, and drives the page in Chromium.

# %%
def _multipart(filename:str, data:bytes, field:str='image') -> tuple[bytes, str]:
    b = 'testboundary' + secrets.token_hex(4)
    body = (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{b}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={b}'

def _request(url, data=None, headers=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.geturl(), resp.read(), resp.headers
    except urllib.error.HTTPError as e: return e.code, url, e.read(), e.headers

def _post(url, filename, data, field='image'):
    body, ctype = _multipart(filename, data, field)
    return _request(url, body, {'Content-Type': ctype})


# %%
with make_server(counter, port=0, max_upload_mb=0.05, max_megapixels=0.1, keep=2, quiet=True) as srv:
    status, _, page, headers = _request(srv.url)
    page = page.decode()
    assert 'Drop a photo here' in page and 'up to 0.05 MB' in page and 'id="result"' not in page
    test_eq((headers['Cache-Control'], headers['X-Content-Type-Options']), ('no-store', 'nosniff'))
    status, url, body, _ = _post(srv.url + 'count', 'crowd.png', photo_png)
    test_eq(status, 200)
    assert url.startswith(srv.url + 'result/') and len(url.rsplit('/', 1)[1]) == 16, url
    page = body.decode()
    assert f'data-count="{expected.count:.2f}">{expected.count:.0f} people</div>' in page, page[-800:]
    assert f'{len(expected.points)} located heads' in page and 'crowd.png: 160×120 px' in page
    rid = url.rsplit('/', 1)[1]
    for show in ('density', 'points'):
        status, _, body, headers = _request(f'{srv.url}result/{rid}/{show}.png')
        test_eq((status, headers['Content-Type']), (200, 'image/png'))
        test_eq(np.asarray(Image.open(io.BytesIO(body)).convert('RGB')),
                np.asarray(render_result(photo, expected, show=show)))
    status, _, body, _ = _post(srv.url + 'api/count', 'crowd.png', photo_png)
    api = json.loads(body)
    test_eq(status, 200)
    test_close(api['count'], expected.count, eps=1e-3)
    test_eq(api['n_points'], len(expected.points))
    test_eq((api['page'], api['name'], api['width'], api['height']),
            (f"/result/{api['id']}", 'crowd.png', 160, 120))
    status, _, body, _ = _request(srv.url + 'api/count', photo_png,
                                  {'Content-Type': 'image/png', 'X-Filename': 'raw.png'})
    test_eq((status, json.loads(body)['name']), (200, 'raw.png'))
    test_close(json.loads(body)['count'], expected.count, eps=1e-3)
    schema = json.loads(_request(srv.url + 'openapi.json')[2])
    body_types = schema['paths']['/api/count']['post']['requestBody']['content']
    test_eq(sorted(body_types), ['application/octet-stream', 'multipart/form-data'])
    assert {'200', '400', '408', '413'} <= set(schema['paths']['/api/count']['post']['responses'])
    # refusals
    status, _, body, _ = _post(srv.url + 'count', 'notes.txt', b'these are my notes, not a photo')
    test_eq(status, 400)
    assert 'notes.txt is not an image: upload a photo' in body.decode()
    status, _, body, _ = _post(srv.url + 'api/count', 'notes.txt', b'%PDF-1.4')
    test_eq((status, json.loads(body)),
            (400, {'error': 'notes.txt is not an image: upload a photo (JPEG, PNG, WebP, BMP, TIFF or GIF)'}))
    status, _, body, headers = _post(srv.url + 'count', 'huge.png', b'\0' * 60_000)
    test_eq((status, headers['Connection']), (413, 'close'))
    assert 'the upload is 0.1 MB; the limit is 0.05 MB' in body.decode()
    big = io.BytesIO()
    Image.new('RGB', (400, 300)).save(big, 'PNG')
    status, _, body, _ = _post(srv.url + 'count', 'wide.png', big.getvalue())
    test_eq(status, 400)
    assert 'wide.png is 400×300 = 0.1 megapixels; the limit is 0.1 megapixels' in body.decode()
    status, _, body, _ = _post(srv.url + 'api/count', 'crowd.png', photo_png, field='photo')
    test_eq((status, json.loads(body)), (400, {'error': "the form has no file field named 'image'"}))
    status, _, body, _ = _post(srv.url + 'elsewhere', 'crowd.png', photo_png)
    test_eq(status, 404)
    assert '/elsewhere: no such page' in body.decode()
    status, _, body, _ = _request(srv.url + 'api/count')
    test_eq((status, json.loads(body)), (405, {'error': 'GET is not answered at /api/count: use POST'}))
    # only the last `keep` results are kept
    for _ in range(2): _post(srv.url + 'count', 'crowd.png', photo_png)
    status, _, body, _ = _request(url)
    test_eq(status, 404)
    assert 'no such result (results are kept for the last 2 photos)' in html.unescape(body.decode())
test_fail(lambda: make_server(counter, host='0.0.0.0', port=0), contains="'0.0.0.0' is not one")
test_fail(lambda: make_server(counter, host='192.168.1.5', port=0), contains='this computer only')

# %%
#| hide
import nbdev
nbdev.nbdev_export()
