"""End-to-end tests of the `uotcrowd` command line on tiny synthetic data (uotcrowd.cli)."""
import csv, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uotcrowd.cli import main
from uotcrowd.data import build_datasets, denormalize
from uotcrowd.train import load_checkpoint, load_model

TINY = ['--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48']


def call(argv, capsys):
    "Run `main(argv)`; returns (exit code, stdout, stderr). argparse's own exits are caught."
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A 2-epoch MCNN + GL run on 16 synthetic 48-px images."
    out = tmp_path_factory.mktemp('train') / 'run'
    code = main(['train', *TINY, '--crop-size', '32', '--model', 'mcnn', '--loss', 'gl', '--eps', '0.01',
                 '--batch-size', '4', '--max-epoch', '2', '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu',
                 '--out', str(out), '--quiet'])
    assert code == 0
    return out


def test_help_of_every_command(capsys):
    for cmd in ([], ['train'], ['eval'], ['predict'], ['demo'], ['bench']):
        code, out, _ = call([*cmd, '--help'], capsys)
        assert code == 0 and out.startswith('usage: uotcrowd'), out
    proc = subprocess.run([sys.executable, '-m', 'uotcrowd', 'train', '--help'], capture_output=True, text=True)
    assert proc.returncode == 0 and '--crop-size' in proc.stdout and '--eps' in proc.stdout


def test_bad_names_list_the_choices(capsys):
    code, _, err = call(['train', '--dataset', 'mall', '--out', 'x'], capsys)
    assert code == 2 and 'shanghaitech-a' in err and 'nwpu' in err
    code, _, err = call(['train', '--dataset', 'synthetic', '--model', 'resnet', '--out', 'x'], capsys)
    assert code == 2 and 'vgg19' in err and 'csrnet' in err and 'mcnn' in err
    code, _, err = call(['train', '--dataset', 'synthetic', '--loss', 'mse', '--out', 'x'], capsys)
    assert code == 2 and 'gl' in err and 'dmcount' in err


def test_missing_data_dir_explains_the_layout(tmp_path, capsys):
    code, _, err = call(['train', '--dataset', 'shanghaitech-a', '--data-dir', str(tmp_path / 'nope'), '--out',
                         str(tmp_path / 'o')], capsys)
    assert code == 2 and 'does not exist' in err and 'part_A/train_data/images' in err
    code, _, err = call(['train', '--dataset', 'qnrf', '--out', str(tmp_path / 'o')], capsys)
    assert code == 2 and 'no --data-dir' in err and 'img_0001_ann.mat' in err


def test_train_writes_a_rebuildable_checkpoint(trained):
    assert {'last.pt', 'best.pt', 'log.csv', 'curves.png', 'config.json'} <= {p.name for p in trained.iterdir()}
    ckpt = load_checkpoint(trained / 'best.pt')
    assert ckpt['model_name'] == 'mcnn' and ckpt['loss_name'] == 'gl' and ckpt['loss_kwargs'] == {'eps': 0.01}
    assert ckpt['config']['data_kwargs']['n_train'] == 16
    rows = list(csv.DictReader(open(trained / 'log.csv')))
    best = min(rows, key=lambda r: float(r['val_mae']))
    assert ckpt['best_epoch'] == int(best['epoch']) and ckpt['best_mae'] == pytest.approx(float(best['val_mae']))


def test_eval_needs_only_the_checkpoint(trained, tmp_path, capsys):
    code, out, _ = call(['eval', '--checkpoint', str(trained / 'best.pt'), '--out', str(tmp_path / 'ev'), '--quiet'], capsys)
    assert code == 0 and 'MAE' in out and 'F1@4px' in out and 'F1@8px' in out
    metrics = json.loads((tmp_path / 'ev' / 'metrics.json').read_text())
    rows = list(csv.DictReader(open(tmp_path / 'ev' / 'per_image.csv')))
    assert list(rows[0])[:4] == ['name', 'gt_count', 'pred_count', 'abs_err'] and len(rows) == 4 == metrics['n']
    # metrics recomputed independently from the same model and the 4 test images
    model, _ = load_model(trained / 'best.pt')
    _, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    err = []
    with torch.no_grad():
        for i in range(len(test_ds)):
            image, points, meta = test_ds[i]
            err.append(model(image[None]).sum().item() - len(points))
            assert rows[i]['name'] == meta['name'] and int(rows[i]['gt_count']) == len(points)
    err = np.array(err)
    assert metrics['mae'] == pytest.approx(np.abs(err).mean(), rel=1e-5)
    assert metrics['rmse'] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
    assert 0 <= metrics['f1@4'] <= metrics['f1@8'] <= 1


def test_predict_on_png_files(trained, tmp_path, capsys):
    _, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    folder = tmp_path / 'imgs'; folder.mkdir()
    for i in range(2):
        rgb = (denormalize(test_ds[i][0]) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f'{i + 1:04d}.png')
    out = tmp_path / 'pred'
    code, stdout, _ = call(['predict', '--checkpoint', str(trained / 'best.pt'), str(folder), '--out', str(out),
                            '--nwpu', '--quiet'], capsys)
    assert code == 0
    rows = list(csv.DictReader(open(out / 'predictions.csv')))
    assert [r['name'] for r in rows] == ['0001', '0002']
    points = json.loads((out / 'points.json').read_text())
    model, _ = load_model(trained / 'best.pt')
    from uotcrowd.data import load_image, to_uint8_tensor, normalize
    with torch.no_grad():
        d = model(normalize(to_uint8_tensor(load_image(folder / '0001.png')))[None])
    assert float(rows[0]['count']) == pytest.approx(d.sum().item(), rel=1e-5)
    assert int(rows[0]['n_points']) == len(points['0001']['points'])
    assert (out / '0001_pred.png').stat().st_size > 1000
    loc = (out / 'nwpu_loc.txt').read_text().split('\n')[0].split()
    assert loc[0] == '1' and int(loc[1]) == len(points['0001']['points']) and len(loc) == 2 + 2 * int(loc[1])
    assert (out / 'nwpu_count.txt').read_text().startswith('1 ')
    code, _, err = call(['predict', '--checkpoint', str(trained / 'best.pt'), str(tmp_path / 'none.png'),
                         '--out', str(out)], capsys)
    assert code == 2 and 'neither an image file nor a folder' in err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / 'demo'
    code, stdout, _ = call(['demo', '--quick', '--budget-s', '6', '--out', str(out), '--device', 'cpu'], capsys)
    assert code == 0, stdout
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('mae', 'rmse', 'baseline_mae', 'f1@4', 'f1@8', 'mean_train_count'): assert k in m
    for f in ('best.pt', 'log.csv', 'curves.png', 'examples.png', 'per_image.csv'): assert (out / f).is_file(), f
    assert 'baseline' in stdout and str(out / 'examples.png') in stdout


def test_bench_quick_subset(tmp_path, capsys):
    code, _, _ = call(['bench', '--quick', '--methods', 'gl_official', '--no-vgg', '--out', str(tmp_path / 'b'),
                       '--quiet'], capsys)
    assert code == 0
    res = json.loads((tmp_path / 'b' / 'bench.json').read_text())
    assert [c['method'] for c in res['cases']] == ['gl_official'] and res['cases'][0]['time_s'] > 0
    assert (tmp_path / 'b' / 'bench.md').stat().st_size > 0
    code, _, err = call(['bench', '--methods', 'magic', '--out', str(tmp_path / 'b')], capsys)
    assert code == 2 and 'gl_official' in err
