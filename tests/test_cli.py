"""End-to-end tests of the `uotcrowd` command line on tiny synthetic data (uotcrowd.cli)."""
import csv, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uotcrowd.cli import main
from uotcrowd.data import build_datasets
from uotcrowd.images import denormalize
from uotcrowd.checkpoints import load_checkpoint, load_model
from uotcrowd.counter import default_precision

TINY = ['--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48']


def call(argv, capsys):
    "Run `main(argv)`; returns (exit code, stdout, stderr). argparse's own exits are caught."
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A 2-epoch MCNN + GL run on 16 synthetic 48-px images, in float32 (eval and predict then run in float32 too)."
    out = tmp_path_factory.mktemp('train') / 'run'
    code = main(['train', *TINY, '--crop-size', '32', '--model', 'mcnn', '--loss', 'gl', '--eps', '0.01',
                 '--batch-size', '4', '--max-epoch', '2', '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu',
                 '--precision', 'fp32', '--ema-decay', '0', '--schedule', 'constant', '--out', str(out), '--quiet'])
    assert code == 0   # 8 steps: an average would be the initial net, a cosine would stop it learning (--ema-decay 0: the last weights)
    return out


def test_help_of_every_command(capsys):
    for cmd in ([], ['train'], ['eval'], ['predict'], ['models'], ['serve'], ['demo'], ['bench']):
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
    from uotcrowd.images import load_image, to_uint8_tensor, normalize
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
    assert code == 2 and 'none.png is neither an image or video file nor a folder' in err


def test_predict_skips_a_corrupt_image_and_reports_it(trained, tmp_path, capsys):
    "One truncated JPEG in a folder: the other images are counted, the bad one is named on stderr and in the CSV."
    _, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    folder = tmp_path / 'imgs'; folder.mkdir()
    for i in range(2):
        Image.fromarray((denormalize(test_ds[i][0]) * 255 + 0.5).astype(np.uint8)).save(folder / f'good{i}.png')
    Image.fromarray((denormalize(test_ds[2][0]) * 255 + 0.5).astype(np.uint8)).save(folder / 'bad.jpg')
    (folder / 'bad.jpg').write_bytes((folder / 'bad.jpg').read_bytes()[:300])  # truncated
    out = tmp_path / 'pred'
    code, _, err = call(['predict', '--checkpoint', str(trained / 'best.pt'), str(folder), '--out', str(out),
                         '--no-plots', '--quiet'], capsys)
    assert code == 2 and 'bad.jpg' in err and '1 of 3 files could not be read' in err
    rows = {r['name']: r for r in csv.DictReader(open(out / 'predictions.csv'))}
    assert set(rows) == {'bad', 'good0', 'good1'}
    assert rows['bad']['count'] == '' and 'bad.jpg: cannot read image' in rows['bad']['error']
    model, _ = load_model(trained / 'best.pt')
    from uotcrowd.images import normalize   # the count of the PNG's own pixels, recomputed without `predict`
    png = torch.from_numpy(np.array(Image.open(folder / 'good0.png').convert('RGB'))).permute(2, 0, 1)
    with torch.no_grad(): expected = model(normalize(png)[None]).sum().item()
    # measured: equal (the same float32 forward); 1e-6 leaves room for another summation order
    assert float(rows['good0']['count']) == pytest.approx(expected, rel=1e-6) and rows['good0']['error'] == ''
    assert set(json.loads((out / 'points.json').read_text())) == {'good0', 'good1'}


def test_eval_never_overwrites_results(trained, tmp_path, capsys):
    "A second evaluation into a folder that holds results is refused unless --overwrite is given."
    ev = tmp_path / 'ev'
    argv = ['eval', '--checkpoint', str(trained / 'best.pt'), '--out', str(ev), '--quiet']
    assert call(argv, capsys)[0] == 0
    (ev / 'metrics.json').write_text('{"kept": true}')
    code, _, err = call(argv, capsys)
    assert code == 2 and str(ev) in err and '--overwrite' in err
    assert json.loads((ev / 'metrics.json').read_text()) == {'kept': True}
    assert call(argv + ['--overwrite'], capsys)[0] == 0
    assert 'mae' in json.loads((ev / 'metrics.json').read_text())


def test_resume_from_another_models_checkpoint_is_one_line(trained, tmp_path, capsys):
    code, _, err = call(['train', *TINY, '--crop-size', '32', '--model', 'csrnet', '--loss', 'gl', '--batch-size', '4',
                         '--max-epoch', '3', '--device', 'cpu', '--out', str(tmp_path / 'r'), '--quiet',
                         '--resume', str(trained / 'last.pt')], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and str(trained / 'last.pt') in err and 'mcnn' in err, err
    assert 'Traceback' not in err


def test_nan_density_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    "A model whose density turns NaN in epoch 2, trained with the real generalized loss through the CLI."
    import uotcrowd.commands  # where `uotcrowd train` builds its model
    make = uotcrowd.commands.get_model
    class NaNAfter(torch.nn.Module):
        def __init__(self, inner, k):
            super().__init__(); self.inner, self.k, self.calls, self.stride = inner, k, 0, inner.stride
        def forward(self, x):
            self.calls += self.training
            d = self.inner(x)
            return d * float('nan') if self.training and self.calls > self.k else d
    monkeypatch.setattr(uotcrowd.commands, 'get_model', lambda *a, **kw: NaNAfter(make(*a, **kw), 4))
    out = tmp_path / 'nan'
    code, _, err = call(['train', *TINY, '--crop-size', '32', '--model', 'mcnn', '--loss', 'gl', '--batch-size', '4',
                         '--max-epoch', '3', '--val-epoch', '1', '--device', 'cpu', '--out', str(out), '--quiet'], capsys)
    assert code == 3 and 'non-finite loss' in err and 'epoch 2, step 0' in err and str(out / 'last.pt') in err, err
    ckpt = load_checkpoint(out / 'last.pt')
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_precision_is_recorded_and_reused(trained, tmp_path, capsys):
    "bf16 training records its precision; eval and predict reuse it unless --precision says otherwise."
    out = tmp_path / 'bf16'
    code, _, _ = call(['train', *TINY, '--crop-size', '32', '--model', 'mcnn', '--batch-size', '4', '--max-epoch', '1',
                       '--max-steps', '2', '--lr', '1e-3', '--device', 'cpu', '--precision', 'bf16', '--out', str(out),
                       '--quiet'], capsys)
    assert code == 0
    assert load_checkpoint(out / 'last.pt')['precision'] == 'bf16'
    assert json.loads((out / 'config.json').read_text())['precision'] == 'bf16'
    assert load_checkpoint(trained / 'best.pt')['precision'] == 'fp32'
    # eval: the checkpoint's precision by default, bf16 counts recomputed independently under autocast
    model, _ = load_model(out / 'last.pt')
    _, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        want = [model(test_ds[i][0][None].contiguous(memory_format=torch.channels_last)).float().sum().item()
                for i in range(len(test_ds))]
    for flag, folder, prec in (([], 'ev', 'bf16'), (['--precision', 'fp32'], 'ev32', 'fp32')):
        code, stdout, _ = call(['eval', '--checkpoint', str(out / 'last.pt'), '--out', str(tmp_path / folder), '--quiet',
                                *flag], capsys)
        assert code == 0 and f'(4 images, {prec}):' in stdout, stdout
        assert json.loads((tmp_path / folder / 'metrics.json').read_text())['precision'] == prec
    got = {f: [float(r['pred_count']) for r in csv.DictReader(open(tmp_path / f / 'per_image.csv'))] for f in ('ev', 'ev32')}
    assert got['ev'] == pytest.approx(want, rel=1e-5)
    assert got['ev32'] == pytest.approx(want, rel=0.01) and got['ev32'] != got['ev']
    # predict: the same counts as eval for the same image, in each precision
    folder = tmp_path / 'imgs'; folder.mkdir()
    Image.fromarray((denormalize(test_ds[0][0]) * 255 + 0.5).astype(np.uint8)).save(folder / '0001.png')
    from uotcrowd.images import read_image
    x = read_image(folder / '0001.png')[None]
    with torch.no_grad():
        want32 = model(x).sum().item()
        with torch.autocast('cpu', dtype=torch.bfloat16): want16 = model(x.contiguous(memory_format=torch.channels_last)).float().sum().item()
    # predict's default: the checkpoint's bf16 where this CPU computes it natively, float32 elsewhere
    want_default = want16 if default_precision('bf16', 'cpu') == 'bf16' else want32
    for flag, name, count in (([], 'p16', want_default), (['--precision', 'fp32'], 'p32', want32),
                              (['--precision', 'bf16'], 'p16b', want16)):
        code, _, _ = call(['predict', '--checkpoint', str(out / 'last.pt'), str(folder), '--out', str(tmp_path / name),
                           '--no-plots', '--quiet', *flag], capsys)
        assert code == 0
        assert float(next(csv.DictReader(open(tmp_path / name / 'predictions.csv')))['count']) == pytest.approx(count, rel=1e-5)


def test_slim_checkpoint_threshold_is_used_by_eval_and_predict(trained, tmp_path, capsys):
    "A slim checkpoint carries the threshold chosen on validation; eval and predict use it unless told otherwise."
    from uotcrowd.checkpoints import slim_checkpoint
    from uotcrowd.localize import localize
    from uotcrowd.images import load_image, to_uint8_tensor, normalize
    _, _, test_ds = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    folder = tmp_path / 'imgs'; folder.mkdir()
    Image.fromarray((denormalize(test_ds[0][0]) * 255 + 0.5).astype(np.uint8)).save(folder / 'a.png')
    model, _ = load_model(trained / 'best.pt')
    with torch.no_grad(): d = model(normalize(to_uint8_tensor(load_image(folder / 'a.png')))[None])
    high = round(0.9 * d.max().item(), 6)  # keeps only the highest peak
    slim = slim_checkpoint(trained / 'best.pt', tmp_path / 'slim.pt', loc_threshold=high)
    assert 'optimizer' not in load_checkpoint(slim) and slim.stat().st_size < (trained / 'best.pt').stat().st_size
    assert call(['eval', '--checkpoint', str(slim), '--out', str(tmp_path / 'ev'), '--quiet'], capsys)[0] == 0
    assert json.loads((tmp_path / 'ev' / 'metrics.json').read_text())['loc_threshold'] == high
    found = []
    for argv, thr in (([], high), (['--loc-threshold', '1e-6'], 1e-6)):
        out = tmp_path / f'pred{len(found)}'
        assert call(['predict', '--checkpoint', str(slim), str(folder), '--out', str(out), '--no-plots', '--quiet', *argv], capsys)[0] == 0
        found.append(int(next(csv.DictReader(open(out / 'predictions.csv')))['n_points']))
        assert found[-1] == len(localize(d, stride=4, threshold=thr)[0]), (thr, found)
    assert found[0] < found[1], found  # the two thresholds are told apart


def test_demo_quick(tmp_path, capsys):
    "The quick demo learns: its test MAE is at most half that of predicting one count for every image."
    out = tmp_path / 'demo'
    # 60 epochs, whatever the machine's speed (the budget is far above what they take)
    code, stdout, _ = call(['demo', '--quick', '--max-epoch', '60', '--budget-s', '1200', '--out', str(out), '--device', 'cpu'], capsys)
    assert code == 0, stdout
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('mae', 'rmse', 'baseline_mae', 'f1@4', 'f1@8', 'mean_train_count'): assert k in m
    for f in ('best.pt', 'log.csv', 'curves.png', 'examples.png', 'per_image.csv'): assert (out / f).is_file(), f
    assert 'baseline' in stdout and str(out / 'examples.png') in stdout
    rows = list(csv.DictReader(open(out / 'per_image.csv')))
    gts = np.array([float(r['gt_count']) for r in rows]); preds = np.array([float(r['pred_count']) for r in rows])
    assert len(rows) == 8 and gts.std() > 10                        # the quick test set, with varied counts
    assert m['mae'] == pytest.approx(np.abs(preds - gts).mean(), rel=1e-6)
    assert m['baseline_mae'] == pytest.approx(np.abs(gts - m['mean_train_count']).mean(), rel=1e-6)
    mean_count_mae = np.abs(gts - gts.mean()).mean()                # predicting the mean test count for every image
    assert m['mae'] <= 0.5 * mean_count_mae and m['mae'] <= 0.5 * m['baseline_mae'], (m['mae'], mean_count_mae, m['baseline_mae'])


def test_demo_with_max_epoch_is_the_same_run_twice(tmp_path, capsys):
    "`uotcrowd demo --quick --max-epoch N` twice, in this process (global RNGs disturbed) and in a fresh one: the same metrics, bit for bit."
    import random
    argv = ['demo', '--quick', '--max-epoch', '8', '--budget-s', '1200', '--device', 'cpu', '--threads', '1', '--quiet']
    random.seed(99); np.random.seed(99); torch.manual_seed(99); torch.rand(5)   # the demo must seed what it uses
    code, stdout, _ = call(argv + ['--out', str(tmp_path / 'a')], capsys)
    assert code == 0, stdout
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'uotcrowd'] + argv + ['--out', str(tmp_path / 'b')], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / 'metrics.json').read_text()) for d in 'ab')
    clock = {'train_time_s', 'total_time_s'}
    assert set(a) == set(b) and a['epochs'] == 8
    assert {k: v for k, v in a.items() if k not in clock} == {k: v for k, v in b.items() if k not in clock}
    assert (tmp_path / 'a' / 'per_image.csv').read_text() == (tmp_path / 'b' / 'per_image.csv').read_text()
    wa, wb = (load_checkpoint(tmp_path / d / 'best.pt')['model'] for d in 'ab')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bench_quick_subset(tmp_path, capsys):
    code, _, _ = call(['bench', '--quick', '--methods', 'gl_official', '--no-vgg', '--out', str(tmp_path / 'b'),
                       '--quiet'], capsys)
    assert code == 0
    res = json.loads((tmp_path / 'b' / 'bench.json').read_text())
    assert [c['method'] for c in res['cases']] == ['gl_official'] and res['cases'][0]['time_s'] > 0
    assert (tmp_path / 'b' / 'bench.md').stat().st_size > 0
    code, _, err = call(['bench', '--methods', 'magic', '--out', str(tmp_path / 'b')], capsys)
    assert code == 2 and 'gl_official' in err


def test_bench_throughput_only(tmp_path, capsys):
    "`--throughput-only`: no loss cases, one throughput row per variant (quick: MCNN only with --no-vgg, one thread)."
    code, _, _ = call(['bench', '--quick', '--throughput-only', '--no-vgg', '--out', str(tmp_path / 't'), '--quiet'], capsys)
    assert code == 0
    res = json.loads((tmp_path / 't' / 'bench.json').read_text())
    assert res['cases'] == [] and 'vgg19' not in res
    rows = res['throughput']['rows']
    assert [(r['model'], r['variant'], r['threads']) for r in rows] == [('mcnn', v, 1) for v in ('fp32', 'fp32+cl', 'bf16+cl', 'fp32+reuse', 'bf16+cl+reuse')]
    assert rows[0]['step_speedup'] == 1 and all(r['step_s'] > 0 and r['eval_s'] > 0 for r in rows)
    assert '**Training throughput**' in (tmp_path / 't' / 'bench.md').read_text()
    code, _, err = call(['bench', '--no-throughput', '--throughput-only', '--out', str(tmp_path / 't')], capsys)
    assert code == 2 and 'exclude each other' in err


def test_bench_loss_sizes_only(tmp_path, capsys):
    "`--loss-sizes-only`: only the loss at training sizes against the official recipe, here one tiny size and round."
    out = tmp_path / 'ls'
    code, _, _ = call(['bench', '--loss-sizes-only', '--quick', '--batch-sizes', '2', '--points', '10', '--size', '8',
                       '--out', str(out), '--quiet'], capsys)
    assert code == 0
    res = json.loads((out / 'bench.json').read_text())
    assert res['cases'] == [] and not {'vgg19', 'throughput', 'onnx'} & set(res)
    (row,) = res['loss_sizes']['rows']
    assert (row['batch_size'], row['n_points'], row['size'], row['threads'], row['runs']) == (2, 10, 8, 1, 1)
    assert row['official_ms'] > 0 and row['recipe_ms'] > 0 and row['loss_difference'] <= 1e-4
    assert row['official_speedup'] == pytest.approx(row['recipe_ms'] / row['official_ms'], rel=1e-9)
    md = (out / 'bench.md').read_text()
    assert '**The loss at training sizes**' in md and '| 2 | 10 | 8×8 | 1 |' in md
    code, _, err = call(['bench', '--loss-sizes-only', '--throughput-only', '--out', str(out)], capsys)
    assert code == 2 and 'exclude each other' in err


def test_train_flags_default_to_train_config():
    "Every `TrainConfig` field that `uotcrowd train` exposes defaults to the dataclass's own value (no drift)."
    import dataclasses
    from uotcrowd.cli import build_parser
    from uotcrowd.config import TrainConfig
    args = build_parser().parse_args(['train', '--dataset', 'synthetic'])
    fresh = TrainConfig()
    record = {'model', 'loss', 'dataset', 'data_dir'}   # what the run is, not how it trains: set by `train` itself
    exposed = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name) and f.name not in record]
    assert len(exposed) >= 25, exposed
    assert {k: getattr(args, k) for k in exposed} == {k: getattr(fresh, k) for k in exposed}
    # the learning rate is left to the network in both: MCNN trains at 1e-4 from Python as from the command line
    assert args.lr is None and fresh.lr is None
