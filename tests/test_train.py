"""Training loop tests that need real modules, subprocesses or several processes (uotcrowd.train)."""
import csv, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from uotcrowd.core import seed_everything
from uotcrowd.data import build_datasets, collate
from uotcrowd.losses import get_loss
from uotcrowd.models import get_model
from uotcrowd.train import TrainConfig, fit, load_checkpoint, load_model, evaluate

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
    # the checkpoint alone rebuilds the model
    model, ckpt = load_model(tmp_path / 'part' / 'last.pt')
    assert ckpt['model_name'] == 'mcnn' and ckpt['stride'] == 4 and ckpt['loss_name'] == 'gl'
    for k, v in model.state_dict().items(): assert torch.equal(v, b[k]), k


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
    assert abs(evaluate(model, val_ds)['mae'] - float(rows[-1]['val_mae'])) < 1e-4
    assert not list(out.glob('.*.tmp'))
