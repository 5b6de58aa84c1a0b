"""Models against torchvision's own VGG implementations (random init, saved to a temporary file)."""
import warnings

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
    m = quiet('vgg19')
    assert n_params(m.features) == n_params(tv_models['vgg19'].features[:-1]) == 20_024_384
    c = quiet('csrnet')
    assert n_params(c.frontend) == n_params(tv_models['vgg16'].features[:23])
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


@pytest.mark.parametrize('name', ['vgg19', 'csrnet', 'mcnn'])
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
