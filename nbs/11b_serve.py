# %% [markdown]
# # Web page
#
# > `uotcrowd serve`: a small local web server where a person drops a photo and sees the count, the density overlay and the located heads.

# %%
#| default_exp serve

# %%
#| export
from __future__ import annotations
import html, io, ipaddress, json, re, secrets, time, warnings
from collections import OrderedDict
from email.message import Message
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import urlparse
import numpy as np
from PIL import Image
from uotcrowd.counter import Counter, CountResult, as_rgb, render_result

# %%
#| hide
import threading, urllib.request, urllib.error
import torch
from fastcore.test import test_eq, test_close, test_fail
from uotcrowd.models import get_model

# %% [markdown]
# The server uses only the standard library (`http.server`) and one `Counter`, loaded when it starts. It listens
# on this computer only (127.0.0.1): photos never leave it. Uploads are limited in size (20 MB by default, checked
# before anything is read) and in pixels (50 megapixels, checked from the image header before it is decoded), and
# anything that is not an image is refused with a message saying so. Large photos are counted in tiles, as by
# `Counter`.
#
# | request | answer |
# |---|---|
# | `GET /` | the upload page (drop a photo, or choose one) |
# | `POST /count` (form field `image`) | `303` to `/result/ID`, or the page with the error (`400`, `413`) |
# | `GET /result/ID` | the page with the count, the density overlay and the located heads |
# | `GET /result/ID/density.png`, `/result/ID/points.png` | the pictures, rendered by the server |
# | `POST /api/count` (a form, or the raw image bytes) | JSON: count, points, picture links; errors as `{"error": ...}` |
#
# Results are kept in memory for the last `keep` photos (16 by default), so a result page can be reloaded.

# %% [markdown]
# ## Reading an upload
#
# A browser sends a form as `multipart/form-data`: parts separated by a boundary line, each with its own headers.
# `parse_multipart` splits them (header parameters are read with the standard `email` machinery, which handles
# quoting); `decode_upload` turns the file's bytes into an RGB array or says what is wrong with them.

# %%
#| export
class UploadError(ValueError):
    "An upload the server refuses; `status` is the HTTP status to answer with."
    def __init__(self, status:int, message:str): super().__init__(message); self.status = status

def _header_params(name:str, value:str) -> Message:
    m = Message(); m[name] = value; return m

def parse_multipart(body:bytes, # the request body
                    content_type:str # its `Content-Type` header, with the boundary
                   ) -> dict[str, tuple[str|None, bytes]]: # `{field name: (file name or None, bytes)}`
    "The fields of a `multipart/form-data` body."
    boundary = _header_params('content-type', content_type).get_param('boundary')
    if not boundary: raise UploadError(400, "the form has no multipart boundary")
    fields = {}
    for part in body.split(b'--' + str(boundary).encode('latin-1'))[1:]:
        if part.startswith(b'--'): break                 # the closing delimiter
        head, sep, data = part.removeprefix(b'\r\n').partition(b'\r\n\r\n')
        if not sep: continue
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(':') for l in head.decode('utf-8', 'replace').split('\r\n'))}
        disp = _header_params('content-disposition', headers.get('content-disposition', ''))
        name = disp.get_param('name', header='content-disposition')
        if name: fields[str(name)] = (disp.get_filename(), data.removesuffix(b'\r\n'))
    return fields

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
    except Image.DecompressionBombError: raise UploadError(400, f"{name} has too many pixels (more than PIL ever decodes)") from None
    except Exception: raise UploadError(400, f"{name} is not an image: upload a photo (JPEG, PNG, WebP, BMP, TIFF or GIF)") from None
    if im.width * im.height > max_pixels:
        raise UploadError(400, f"{name} is {im.width}×{im.height} = {im.width * im.height / 1e6:.1f} megapixels; "
                               f"the limit is {max_pixels / 1e6:g} megapixels")
    try: im.load()
    except Exception as e: raise UploadError(400, f"{name} is a corrupt or truncated {im.format} image ({e})") from None
    return as_rgb(im)


# %%
png = io.BytesIO(); Image.fromarray(np.full((6, 8, 3), 200, np.uint8)).save(png, 'PNG'); png = png.getvalue()
body = (b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a \\"b\\".png"\r\nContent-Type: image/png\r\n\r\n'
        + png + b'\r\n--XyZ--\r\n')
f = parse_multipart(body, 'multipart/form-data; boundary=XyZ')
test_eq(f['note'], (None, b'hello')); test_eq(f['image'], ('a "b".png', png))
test_eq(decode_upload(png, 'a.png').shape, (6, 8, 3))
test_fail(lambda: decode_upload(b'%PDF-1.4 not a photo', 'scan.pdf'), contains='scan.pdf is not an image')
test_fail(lambda: decode_upload(b'', 'x.jpg'), contains='x.jpg is empty')
test_fail(lambda: decode_upload(png, 'a.png', max_pixels=40), contains='a.png is 8×6 = 0.0 megapixels; the limit is 4e-05')
noisy = io.BytesIO(); Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy, 'PNG')
test_fail(lambda: decode_upload(noisy.getvalue()[:3000], 'cut.png'), contains='cut.png is a corrupt or truncated PNG image')
test_fail(lambda: parse_multipart(body, 'multipart/form-data'), contains='no multipart boundary')


# %% [markdown]
# ## The page
#
# One HTML page, without external resources: the upload form (a drop zone that submits as soon as a photo is
# dropped or chosen; the size limit is also checked in the browser), then, for a result, the count in large type,
# the numbers behind it, and the two pictures. Error messages are shown in the same page.

# %%
#| export
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px} .model{color:#555;margin:0 0 16px}
#drop{display:block;border:3px dashed #8a94a6;border-radius:12px;padding:36px;text-align:center;background:#fff;cursor:pointer;font-size:1.1rem}
#drop.over{border-color:#1f6feb;background:#eef4ff} #image{margin-top:8px} button{font-size:1rem;padding:6px 16px;margin-left:8px}
.error{background:#fde8e8;border:2px solid #c81e1e;color:#7f1d1d;border-radius:8px;padding:12px 16px;margin:16px 0;font-size:1.05rem}
#count{display:inline-block;background:#c81e5b;color:#fff;font-size:2.6rem;font-weight:700;border-radius:12px;padding:10px 24px;margin:20px 0 6px}
.facts{color:#333;margin:4px 0 16px} .pics{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;flex:1 1 420px} figure img{width:100%;border-radius:6px;display:block} figcaption{color:#555;margin-top:4px}
"""

_JS = """
const form = document.getElementById('upload'), input = document.getElementById('image'), drop = document.getElementById('drop');
const limit = Number(form.dataset.maxBytes), status = document.getElementById('status');
function send() {
  if (!input.files.length) return;
  if (input.files[0].size > limit) { status.textContent = input.files[0].name + ' is larger than the ' + form.dataset.maxMb + ' MB limit'; return; }
  status.textContent = 'counting ' + input.files[0].name + '...'; form.submit();
}
input.addEventListener('change', send);
form.addEventListener('submit', ev => { ev.preventDefault(); send(); });
['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, ev => { ev.preventDefault(); drop.classList.add('over'); }));
['dragleave', 'drop'].forEach(t => drop.addEventListener(t, ev => { ev.preventDefault(); drop.classList.remove('over'); }));
drop.addEventListener('drop', ev => { if (ev.dataTransfer.files.length) { input.files = ev.dataTransfer.files; send(); } });
"""

def _model_line(counter:Counter) -> str:
    c = counter.card or {}
    arch, loss, data = (c.get('architecture') or {}).get('model'), (c.get('loss') or {}).get('name'), c.get('dataset')
    test = c.get('test') or {}
    what = f": {arch} trained with the {loss} loss on {data}" if arch and loss and data else ''
    mae = f"; test MAE {test['mae']:.1f}, RMSE {test['rmse']:.1f}" if 'mae' in test and 'rmse' in test else ''
    return f"Model <b>{html.escape(counter.name)}</b>{html.escape(what)}{mae}. Photos stay on this computer."

def render_page(counter:Counter, # the server's counter (its name and card are shown)
                max_upload_mb:float=20, # shown, and checked in the browser
                result:dict|None=None, # a stored result (`CountingServer.results` value) to show
                error:str|None=None # a message to show instead
               ) -> str:
    "The HTML of the upload page, with a result or an error."
    max_bytes = int(max_upload_mb * 2**20)
    parts = [f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>uotcrowd: count people in a photo</title>'
             f'<style>{_CSS}</style></head><body><main><h1>Count people in a photo</h1><p class="model">{_model_line(counter)}</p>'
             f'<form id="upload" method="post" action="/count" enctype="multipart/form-data" data-max-bytes="{max_bytes}" data-max-mb="{max_upload_mb:g}">'
             f'<label id="drop" for="image">Drop a photo here, or click to choose one<br><small>JPEG, PNG, WebP, BMP, TIFF; '
             f'up to {max_upload_mb:g} MB</small></label><input id="image" type="file" name="image" accept="image/*">'
             f'<button type="submit">Count</button> <span id="status"></span></form>']
    if error: parts.append(f'<p class="error" id="error">{html.escape(error)}</p>')
    if result:
        rid, r = result['id'], result['result']
        name = html.escape(result['name'] or 'photo')
        tiles = f" · counted in {r.tiles} tiles" if r.tiles > 1 else ''
        parts.append(f'<section id="result"><div id="count" data-count="{r.count:.2f}">{r.count:.0f} people</div>'
                     f'<p class="facts">{name}: {r.width}×{r.height} px · density sum {r.count:.2f} · {len(r.points)} located heads'
                     f'{tiles} · {result["seconds"]:.1f} s</p><div class="pics">'
                     f'<figure><img src="/result/{rid}/density.png" alt="density map of {name}"><figcaption>density map '
                     f'(sum = count)</figcaption></figure><figure><img src="/result/{rid}/points.png" alt="located heads in {name}">'
                     f'<figcaption>{len(r.points)} located heads (density peaks above {counter.loc_threshold:g})</figcaption></figure></div></section>')
    parts.append(f'<script>{_JS}</script></main></body></html>')
    return ''.join(parts)


# %% [markdown]
# ## The server
#
# `CountingServer` is an `http.server.HTTPServer` (one request at a time: the model is not shared between
# threads) holding the counter, the limits and the recent results; `CountingHandler` answers the requests above.
# `make_server` builds one without starting it (port 0 picks a free port), `serve` builds one and serves until
# interrupted.

# %%
#| export
_RESULT_PATH = re.compile(r'/result/([0-9a-f]{16})(?:/(density|points)\.png)?')

class CountingHandler(BaseHTTPRequestHandler):
    "Answers the upload page, form and API posts, result pages and their pictures."
    server_version = 'uotcrowd-serve'

    def log_message(self, format, *args):
        if not self.server.quiet: super().log_message(format, *args)

    def _send(self, status:int, ctype:str, body:bytes):
        self.send_response(status)
        self.send_header('Content-Type', ctype); self.send_header('Content-Length', str(len(body)))
        self.send_header('Cache-Control', 'no-store'); self.send_header('X-Content-Type-Options', 'nosniff')
        self.end_headers()
        if self.command != 'HEAD': self.wfile.write(body)

    def _page(self, status:int, **kw): self._send(status, 'text/html; charset=utf-8', self.server.page(**kw).encode())
    def _json(self, status:int, obj): self._send(status, 'application/json', json.dumps(obj).encode())

    def do_GET(self):
        path = urlparse(self.path).path
        if path in ('/', '/index.html'): return self._page(200)
        m = _RESULT_PATH.fullmatch(path)
        if m and m[1] in self.server.results:
            stored = self.server.results[m[1]]
            return self._send(200, 'image/png', stored['png'][m[2]]) if m[2] else self._page(200, result=stored)
        self._page(404, error=f"{path}: no such page (results are kept for the last {self.server.keep} photos)")
    do_HEAD = do_GET

    def _upload(self) -> tuple[bytes, str|None]:
        length = self.headers.get('Content-Length')
        if length is None or not length.isdigit(): raise UploadError(411, "the upload did not say its size (Content-Length)")
        if int(length) > self.server.max_upload_bytes:
            self.close_connection = True                 # the body is not read
            raise UploadError(413, f"the upload is {int(length) / 2**20:.1f} MB; the limit is {self.server.max_upload_mb:g} MB")
        body = self.rfile.read(int(length))
        ctype = self.headers.get('Content-Type', '')
        if ctype.startswith('multipart/form-data'):
            fields = parse_multipart(body, ctype)
            if 'image' not in fields: raise UploadError(400, "the form has no file field named 'image'")
            filename, data = fields['image']
            return data, filename
        return body, self.headers.get('X-Filename')

    def do_POST(self):
        path = urlparse(self.path).path
        api = path == '/api/count'
        if path not in ('/count', '/api/count'): return self._page(404, error=f"{path}: photos are posted to /count")
        try:
            data, filename = self._upload()
            rgb = decode_upload(data, filename, self.server.max_pixels)
        except UploadError as e:
            return self._json(e.status, {'error': str(e)}) if api else self._page(e.status, error=str(e))
        stored = self.server.count(rgb, filename)
        if api:
            rid = stored['id']
            return self._json(200, {'id': rid, 'name': filename, **stored['result'].to_dict(), 'seconds': round(stored['seconds'], 3),
                                    'page': f'/result/{rid}', 'density_png': f'/result/{rid}/density.png',
                                    'points_png': f'/result/{rid}/points.png'})
        self.send_response(303); self.send_header('Location', f"/result/{stored['id']}"); self.send_header('Content-Length', '0')
        self.end_headers()

class CountingServer(HTTPServer):
    "A local HTTP server that counts people in uploaded photos with one `Counter`."
    def __init__(self, counter:Counter, # the model, loaded once
                 host:str='127.0.0.1', # a loopback address: the server is reachable from this computer only
                 port:int=8000, # 0 picks a free port
                 max_upload_mb:float=20, # larger uploads are refused (413) before they are read
                 max_megapixels:float=50, # larger images are refused (400) before they are decoded
                 keep:int=16, # results kept for their pages
                 quiet:bool=False # no request log
                ):
        addr = '127.0.0.1' if host == 'localhost' else host
        try: loopback = ipaddress.ip_address(addr).is_loopback and ipaddress.ip_address(addr).version == 4
        except ValueError: loopback = False
        if not loopback: raise ValueError(f"the server listens on this computer only (127.0.0.1 or another 127.x address); {host!r} is not one")
        if max_upload_mb <= 0: raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
        self.counter, self.max_upload_mb, self.keep, self.quiet = counter, max_upload_mb, max(1, keep), quiet
        self.max_upload_bytes, self.max_pixels = int(max_upload_mb * 2**20), int(max_megapixels * 1e6)
        self.results:OrderedDict[str, dict] = OrderedDict()
        super().__init__((addr, port), CountingHandler)

    @property
    def url(self) -> str: return f"http://{self.server_address[0]}:{self.server_address[1]}/"

    def page(self, **kw) -> str: return render_page(self.counter, self.max_upload_mb, **kw)

    def count(self, rgb:np.ndarray, name:str|None=None) -> dict:
        "Count `rgb`, render its pictures, keep the result; returns the stored result."
        t = time.perf_counter()
        r = self.counter(rgb)
        secs = time.perf_counter() - t
        pngs = {}
        for show in ('density', 'points'):
            buf = io.BytesIO(); render_result(rgb, r, show=show, max_side=1280).save(buf, 'PNG'); pngs[show] = buf.getvalue()
        rid = secrets.token_hex(8)
        self.results[rid] = {'id': rid, 'name': name, 'result': r, 'seconds': secs, 'png': pngs}
        while len(self.results) > self.keep: self.results.popitem(last=False)
        return self.results[rid]

def make_server(checkpoint:str|Counter, # checkpoint file, named model, or a `Counter`
                host:str='127.0.0.1', port:int=8000, max_upload_mb:float=20, max_megapixels:float=50, keep:int=16,
                quiet:bool=False, **counter_kwargs # passed to `Counter` (`device`, `precision`, `loc_threshold`, `tile`)
               ) -> CountingServer:
    "A `CountingServer` for `checkpoint`, bound but not yet serving."
    counter = checkpoint if isinstance(checkpoint, Counter) else Counter(checkpoint, **counter_kwargs)
    return CountingServer(counter, host, port, max_upload_mb, max_megapixels, keep, quiet)


# %%
#| export
def serve(checkpoint:str, # checkpoint file or named model (`uotcrowd models`)
          host:str='127.0.0.1', # loopback address to listen on (the page is reachable from this computer only)
          port:int=8000, # port (0: any free port)
          max_upload_mb:float=20, # largest upload accepted, in MB
          max_megapixels:float=50, # largest image accepted, in megapixels
          device:str='auto', # 'auto', 'cpu', 'cuda', 'mps'
          precision:str|None=None, # default: the checkpoint's
          loc_threshold:float|None=None, # default: the checkpoint's
          tile:int|None=None, # tile side for large photos (None automatic, 0 never)
          open_browser:bool=False, # open the page in the default browser
          quiet:bool=False # no request log
         ):
    "Serve a local web page where a person drops a photo and sees the count, the density overlay and the located heads."
    srv = make_server(checkpoint, host, port, max_upload_mb, max_megapixels, quiet=quiet, device=device, precision=precision,
                      loc_threshold=loc_threshold, tile=tile)
    print(f"uotcrowd serve: counting with {srv.counter.name} ({srv.counter.device}) at {srv.url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser; webbrowser.open(srv.url)
    try: srv.serve_forever()
    except KeyboardInterrupt: pass
    finally: srv.server_close()


# %% [markdown]
# ## End to end
#
# A server on a free port in a thread, with random MCNN weights: the page, a photo posted as a browser posts it
# (followed to its result page, whose count is the counter's), the pictures, the API, and the refusals: a file
# that is not an image, an upload over the size limit, an image over the pixel limit, an unknown page, and a
# server asked to listen beyond this computer.

# %%
def _multipart(filename:str, data:bytes, field:str='image') -> tuple[bytes, str]:
    b = 'testboundary' + secrets.token_hex(4)
    body = (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{b}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={b}'

def _post(url, filename, data, field='image'):
    body, ctype = _multipart(filename, data, field)
    req = urllib.request.Request(url, data=body, headers={'Content-Type': ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp: return resp.status, resp.geturl(), resp.read()
    except urllib.error.HTTPError as e: return e.code, url, e.read()


# %%
torch.manual_seed(0)
photo = np.kron(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8), np.ones((10, 10, 1), np.uint8))   # blocks: a small PNG
jpg = io.BytesIO(); Image.fromarray(photo).save(jpg, 'PNG'); jpg = jpg.getvalue()
assert len(jpg) < 0.05 * 2**20
counter = Counter(get_model('mcnn').eval(), device='cpu')
expected = counter(photo)
srv = make_server(counter, port=0, max_upload_mb=0.05, max_megapixels=0.1, keep=2, quiet=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
try:
    with urllib.request.urlopen(srv.url, timeout=30) as resp: page = resp.read().decode()
    assert 'Drop a photo here' in page and 'up to 0.05 MB' in page and 'id="result"' not in page
    status, url, body = _post(srv.url + 'count', 'crowd.png', jpg)
    test_eq(status, 200); assert re.fullmatch(srv.url + r'result/[0-9a-f]{16}', url), url
    page = body.decode()
    assert f'data-count="{expected.count:.2f}">{expected.count:.0f} people</div>' in page, page[-800:]
    assert f'{len(expected.points)} located heads' in page and 'crowd.png: 160×120 px' in page
    rid = url.rsplit('/', 1)[1]
    for show in ('density', 'points'):
        with urllib.request.urlopen(f'{srv.url}result/{rid}/{show}.png', timeout=30) as resp:
            test_eq(resp.headers['Content-Type'], 'image/png')
            test_eq(np.asarray(Image.open(io.BytesIO(resp.read())).convert('RGB')), np.asarray(render_result(photo, expected, show=show)))
    status, _, body = _post(srv.url + 'api/count', 'crowd.png', jpg)
    api = json.loads(body)
    test_eq(status, 200); test_close(api['count'], expected.count, eps=1e-3); test_eq(api['n_points'], len(expected.points))
    test_eq(api['page'], f"/result/{api['id']}")
    # refusals
    status, _, body = _post(srv.url + 'count', 'notes.txt', b'these are my notes, not a photo')
    test_eq(status, 400); assert 'notes.txt is not an image: upload a photo' in body.decode()
    status, _, body = _post(srv.url + 'api/count', 'notes.txt', b'%PDF-1.4')
    test_eq((status, json.loads(body)), (400, {'error': 'notes.txt is not an image: upload a photo (JPEG, PNG, WebP, BMP, TIFF or GIF)'}))
    status, _, body = _post(srv.url + 'count', 'huge.png', b'\0' * 60_000)
    test_eq(status, 413); assert 'the upload is 0.1 MB; the limit is 0.05 MB' in body.decode()
    big = io.BytesIO(); Image.new('RGB', (400, 300)).save(big, 'PNG')
    status, _, body = _post(srv.url + 'count', 'wide.png', big.getvalue())
    test_eq(status, 400); assert 'wide.png is 400×300 = 0.1 megapixels; the limit is 0.1 megapixels' in body.decode()
    status, _, body = _post(srv.url + 'count', 'crowd.png', jpg, field='photo')
    test_eq(status, 400); assert "no file field named 'image'" in html.unescape(body.decode())
    status, _, _ = _post(srv.url + 'elsewhere', 'crowd.png', jpg); test_eq(status, 404)
    # only the last `keep` results are kept
    for _ in range(2): _post(srv.url + 'count', 'crowd.png', jpg)
    try: urllib.request.urlopen(url, timeout=30); raise AssertionError('an old result is still served')
    except urllib.error.HTTPError as e: test_eq(e.code, 404)
finally:
    srv.shutdown(); srv.server_close()
test_fail(lambda: make_server(counter, host='0.0.0.0', port=0), contains="'0.0.0.0' is not one")
test_fail(lambda: make_server(counter, host='192.168.1.5', port=0), contains='this computer only')

# %%
#| hide
import nbdev; nbdev.nbdev_export()
