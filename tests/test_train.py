"""Training loop tests that need real modules, subprocesses or several processes (uotcrowd.train)."""
import csv, os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch

from uotcrowd.core import seed_everything
from uotcrowd.data import build_datasets, collate
from uotcrowd.registry import get_loss
from uotcrowd.models import get_model
from uotcrowd.checkpoints import load_checkpoint, load_model
from uotcrowd.config import TrainConfig
from uotcrowd.train import fit
from uotcrowd.evaluate import evaluate
from uotcrowd.data import ShanghaiTech

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(seed=0):
    "16 training crops of 48 px from 64 px synthetic images; 4 validation and 4 test images."
    return build_datasets('synthetic', crop_size=48, stride=4, n_train=16, n_val=4, n_test=4, size=64, seed=seed)


def run(out, max_epoch, resume=None, lr=1e-3):
    train_ds, val_ds, _ = tiny_data()
    seed_everything(0)
    model = get_model('mcnn')
    cfg = TrainConfig(out_dir=str(out), max_epoch=max_epoch, batch_size=4, lr=lr, quiet=True, seed=3, resume=resume,
                      device='cpu', model='mcnn', loss='gl', dataset='synthetic')
    res = fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
    return model, res


def test_two_epochs_lower_the_loss(tmp_path):
    "The generalized loss on a fixed batch of full validation images is lower after 2 epochs than before."
    _, val_ds, _ = tiny_data()
    images, points, _ = collate([val_ds[i] for i in range(len(val_ds))])
    seed_everything(0)
    before_model = get_model('mcnn')
    loss = get_loss('gl', stride=4)
    with torch.no_grad(): before = loss(before_model(images), points).item()
    model, res = run(tmp_path / 'run', 2)
    with torch.no_grad(): after = loss(model.eval()(images), points).item()
    assert after < before, (before, after)
    assert res['history'][1]['train_loss'] < res['history'][0]['train_loss']
    rows = list(csv.DictReader(open(tmp_path / 'run' / 'log.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1] and all(r['val_mae'] for r in rows)
    assert (tmp_path / 'run' / 'curves.png').stat().st_size > 1000


def _cpu_autocast_runs(dtype) -> bool:
    "Whether a convolution runs forward and backward under CPU autocast in `dtype` (natively or emulated)."
    try:
        conv, x = torch.nn.Conv2d(3, 2, 3), torch.randn(1, 3, 8, 8)
        with torch.autocast('cpu', dtype=dtype): y = conv(x)
        y.float().sum().backward()
        return y.dtype == dtype
    except (RuntimeError, TypeError): return False


class DtypeSpy(torch.nn.Module):
    "A loss that records the dtype and memory layout of every density it receives."
    def __init__(self, loss):
        super().__init__(); self.loss, self.seen = loss, []
    def forward(self, density, points):
        self.seen.append(density.dtype)
        return self.loss(density, points)


DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@pytest.mark.parametrize('precision', ['fp32', 'bf16', pytest.param('fp16', marks=pytest.mark.skipif(
    not _cpu_autocast_runs(torch.float16), reason='this torch build has no float16 autocast on the CPU'))])
def test_each_precision_trains_and_the_loss_gets_float32(tmp_path, precision):
    "Training in each precision lowers the (float32) loss on fixed images; the model computes in that precision, the loss never does."
    train_ds, val_ds, _ = tiny_data()
    images, points, _ = collate([val_ds[i] for i in range(len(val_ds))])
    seed_everything(0)
    model = get_model('mcnn')
    gl = get_loss('gl', stride=4)
    with torch.no_grad(): before = gl(model(images), points).item()
    outputs = []
    hook = model.register_forward_hook(
        lambda m, inp, out: outputs.append((out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last))))
    spy = DtypeSpy(gl)
    # fp16: the GradScaler skips the steps whose scaled gradients overflow float16 while it lowers its scale from
    # 2^16 (the whole first epoch here), so it gets 4 epochs
    epochs = 4 if precision == 'fp16' else 2
    cfg = TrainConfig(out_dir=str(tmp_path), max_epoch=epochs, batch_size=4, lr=1e-3, quiet=True, seed=3, device='cpu',
                      precision=precision, model='mcnn', loss='gl', dataset='synthetic')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # fp16 is emulated on most CPUs, which `fit` warns about
        res = fit(model, spy, train_ds, val_ds, cfg)
    hook.remove()
    with torch.no_grad(): after = gl(model.eval()(images.contiguous()), points).item()  # judged in float32
    assert after < before, (precision, before, after)
    assert len(spy.seen) == 4 * epochs and set(spy.seen) == {torch.float32}  # 4 steps per epoch, all float32
    # the model ran in the requested precision and layout, in training steps and validation alike
    assert len(outputs) == epochs * (4 + len(val_ds))
    assert set(outputs) == {(DTYPES[precision], precision != 'fp32')}, set(outputs)
    ckpt = load_checkpoint(res['last'])
    assert ckpt['precision'] == precision
    assert (ckpt['scaler'].get('scale', 2. ** 16) < 2. ** 16) == (precision == 'fp16')  # a GradScaler in fp16 only
    assert res['history'][-1]['val_mae'] is not None


def test_bf16_counts_agree_with_fp32_on_real_images(fixtures_dir):
    "An MCNN trained on ShanghaiTech B (GL, 20 epochs) counts real part B images in bf16 within 1 % of float32."
    model, ckpt = load_model(ROOT / 'tests' / 'fixtures' / 'mcnn_shb_gl.pt')
    ds = ShanghaiTech(fixtures_dir / 'ShanghaiTech', 'B', 'train')
    assert len(ds) == 2 and ckpt['precision'] == 'fp32'
    c32, c16 = ([r['pred_count'] for r in evaluate(model, ds, precision=p)['per_image']] for p in ('fp32', 'bf16'))
    with torch.no_grad():  # the float32 counts, recomputed without `evaluate`
        ref = [model(ds[i][0][None]).sum().item() for i in range(len(ds))]
    assert c32 == pytest.approx(ref, rel=1e-6)
    assert min(ref) > 50  # a trained model: it counts people (167 and 229 annotated), not noise
    assert c16 == pytest.approx(c32, rel=0.01) and c16 != c32


def test_resume_gives_identical_weights(tmp_path):
    "2 epochs in one go == 1 epoch, then a resumed 2nd epoch: all weights and optimizer moments exactly equal."
    full, _ = run(tmp_path / 'full', 2)
    run(tmp_path / 'part', 1)
    seed_everything(1234)  # the global RNG state before resuming must not matter
    resumed, res = run(tmp_path / 'part', 2, resume=str(tmp_path / 'part' / 'last.pt'))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    oa = load_checkpoint(tmp_path / 'full' / 'last.pt')['optimizer']['state']
    ob = load_checkpoint(tmp_path / 'part' / 'last.pt')['optimizer']['state']
    for k in oa:
        assert torch.equal(oa[k]['exp_avg'], ob[k]['exp_avg']) and torch.equal(oa[k]['exp_avg_sq'], ob[k]['exp_avg_sq'])
    assert [h['epoch'] for h in res['history']] == [0, 1]
    # the weight average continues exactly, and the checkpoint alone rebuilds the model with it (what was validated)
    ea, eb = load_checkpoint(tmp_path / 'full' / 'last.pt')['ema'], load_checkpoint(tmp_path / 'part' / 'last.pt')['ema']
    for k in ea: assert torch.equal(ea[k], eb[k]), k
    model, ckpt = load_model(tmp_path / 'part' / 'last.pt')
    assert ckpt['model_name'] == 'mcnn' and ckpt['stride'] == 4 and ckpt['loss_name'] == 'gl'
    for k, v in model.state_dict().items(): assert torch.equal(v, eb[k]), k
    assert not all(torch.equal(v, b[k]) for k, v in model.state_dict().items())   # the average, not the last step


def test_checkpoint_loads_weights_only(tmp_path):
    _, res = run(tmp_path / 'run', 1)
    ckpt = torch.load(res['last'], weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['config']['model'] == 'mcnn' and isinstance(ckpt['config'], dict)
    assert {'python', 'numpy', 'torch'} <= set(ckpt['rng'])


@pytest.mark.timeout(120)
def test_ddp_gloo_two_processes(tmp_path):
    "`torchrun --nproc_per_node=2 -m uotcrowd.cli train` on CPU (gloo): one set of files, written by rank 0."
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'uotcrowd.cli', 'train', '--dataset', 'synthetic', '--synthetic-n', '16', '--synthetic-size', '48',
           '--crop-size', '32', '--model', 'mcnn', '--loss', 'gl', '--batch-size', '2', '--max-epoch', '2',
           '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu', '--out', str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load_checkpoint(out / 'last.pt')
    assert ckpt['world_size'] == 2 and ckpt['epoch'] == 2
    rows = list(csv.DictReader(open(out / 'log.csv')))
    assert len(rows) == 2 and all(r['val_mae'] for r in rows)
    # rank 0 alone prints the epoch lines; both ranks validated on disjoint halves of the 4 validation images,
    # and the gathered metric equals a single-process evaluation of the saved weights
    assert proc.stdout.count('epoch 2/2') == 1, proc.stdout
    model, _ = load_model(out / 'last.pt')
    _, val_ds, _ = build_datasets('synthetic', crop_size=32, stride=4, n_train=16, n_val=4, n_test=4, size=48)
    assert abs(evaluate(model, val_ds, precision=ckpt['precision'])['mae'] - float(rows[-1]['val_mae'])) < 1e-4
    assert not list(out.glob('.*.tmp'))


@pytest.mark.timeout(240)
def test_ddp_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    "`--time-budget` under torchrun with 2 processes: rank 0's clock decides, both ranks stop together, exit 0."
    out = tmp_path / 'ddp_budget'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'uotcrowd.cli', 'train', '--dataset', 'synthetic', '--synthetic-n', '32', '--synthetic-size', '48',
           '--crop-size', '32', '--model', 'mcnn', '--loss', 'gl', '--batch-size', '2', '--max-epoch', '10000',
           '--val-epoch', '1', '--lr', '1e-3', '--device', 'cpu', '--time-budget', '6', '--out', str(out)]
    # rank 1's clock runs 1000 times too fast: were the ranks to read their own clocks, rank 1 would stop at its
    # first step while rank 0 went on, and their collectives would no longer pair up
    skew = tmp_path / 'skew'; skew.mkdir()
    (skew / 'sitecustomize.py').write_text(
        "import os, time\nif os.environ.get('RANK') == '1':\n    _pc = time.perf_counter; _t0 = _pc()\n"
        "    time.perf_counter = lambda: _t0 + 1000. * (_pc() - _t0)\n")
    env = {**os.environ, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join([str(skew)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=220, env=env, cwd=tmp_path)
    text = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and 'non-finite' not in text, text
    assert proc.stdout.count('time budget of 6s spent') == 1, text
    ckpt = load_checkpoint(out / 'last.pt')
    assert ckpt['world_size'] == 2 and 1 <= ckpt['epoch'] < 10000 and ckpt['train_time_s'] >= 6
    rows = list(csv.DictReader(open(out / 'log.csv')))
    assert len(rows) == ckpt['epoch'] and rows[-1]['val_mae']  # the interrupted epoch was validated and saved


@pytest.mark.parametrize('plateau_start,epochs', [(0, 3), (2, 5)])
def test_patience_stops_and_a_finished_run_stays_finished(tmp_path, plateau_start, epochs):
    """lr 0: the validation MAE never improves after the first watched epoch, so patience 2 stops two epochs after it
    (after epoch 3, or 5 with the first two epochs a warm-up); resuming adds nothing."""
    train_ds, val_ds, _ = tiny_data()
    def go(resume=None):
        seed_everything(0)
        model = get_model('mcnn')
        cfg = TrainConfig(out_dir=str(tmp_path / 'p'), max_epoch=10, batch_size=4, lr=0., quiet=True, seed=3,
                          schedule='plateau', patience=2, lr_patience=1, lr_decay=0.5, plateau_start=plateau_start, resume=resume,
                          device='cpu', model='mcnn', loss='gl', dataset='synthetic')
        return fit(model, get_loss('gl', stride=model.stride), train_ds, val_ds, cfg)
    res = go()
    assert res['converged'] and res['epochs'] == epochs and res['best_epoch'] == 0
    assert [h['val_mae'] for h in res['history']] == [res['history'][0]['val_mae']] * epochs
    again = go(resume=str(tmp_path / 'p' / 'last.pt'))
    assert again['converged'] and again['epochs'] == epochs and len(again['history']) == epochs
    assert load_checkpoint(tmp_path / 'p' / 'last.pt')['epoch'] == epochs
