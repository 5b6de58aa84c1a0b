# %% [markdown]
# # Reproducing the paper on real data
#
# > One command per row of the paper's Tables 1, 3, 4 and 5, with the published numbers beside the cells to fill.

# %% [markdown]
# These runs need the public datasets (downloaded by the user into `DATA/`, in their official layouts, see
# [the data page](../05c_data.ipynb)) and a GPU host: the paper trains 500 epochs with batch size 1. Each row is
# a `uotcrowd train` command followed by `uotcrowd eval` on the test split; the model is chosen on a validation
# hold-out from the training split (ShanghaiTech, UCF-QNRF) or on the official validation split (JHU-Crowd++,
# NWPU-Crowd), never on the test split. VGG19 and CSRNet start from ImageNet weights, which cannot be downloaded
# by the package: save torchvision's `vgg19(weights='IMAGENET1K_V1').state_dict()` (or `vgg16` for CSRNet) on a
# machine with internet and pass the file with `--weights`. MCNN is trained from scratch, as in the paper.
#
# Settings follow the paper (Sec. 5.1) and its official code: Adam, learning rate $10^{-5}$ (VGG19/CSRNet) or
# $10^{-4}$ (MCNN), weight decay $10^{-5}$, batch 1, crop 512 (256 on ShanghaiTech A), horizontal flips, the
# perspective-guided cost, and validation every 5 epochs. The generalized-loss rows train with `--loss gl-official`, the
# objective the official trainer computes (its transport value, entropy mean, empty-image terms and 8j+8 grid; see
# [the losses page](../04_losses.ipynb)), since that is what produced the published numbers; `--loss gl` is the paper's
# Eq. 1 as written.

# %%
import pandas as pd

# %%

DATASETS = {'qnrf': 'UCF-QNRF', 'nwpu': 'NWPU-Crowd', 'jhu': 'JHU-Crowd++',
            'shanghaitech-a': 'ShanghaiTech A', 'shanghaitech-b': 'ShanghaiTech B'}
CROP = {'shanghaitech-a': 256}
LR = {'vgg19': 1e-5, 'csrnet': 1e-5, 'mcnn': 1e-4}

def commands(dataset, model, loss, epochs=500, data_dir='DATA'):
    "The train and eval commands of one table cell."
    out = f'runs/{dataset}_{model}_{loss}'
    weights = '' if model == 'mcnn' else f' --weights {model}_imagenet.pth' if model == 'vgg19' else ' --weights vgg16_imagenet.pth'
    flag = 'gl-official' if loss == 'gl' else loss   # the paper's GL numbers come from the official trainer's objective
    train = (f'uotcrowd train --dataset {dataset} --data-dir {data_dir} --model {model} --loss {flag}'
             f' --crop-size {CROP.get(dataset, 512)} --lr {LR[model]:g} --batch-size 1 --max-epoch {epochs}'
             f' --val-epoch 5 --out {out}{weights}')
    evaluate = f'uotcrowd eval --checkpoint {out}/best.pt --dataset {dataset} --data-dir {data_dir} --split test'
    return train, evaluate


# %% [markdown]
# ## Table 1: losses × backbones on UCF-QNRF
#
# The paper's MAE / MSE (its "MSE" is the root mean squared error) for four of the five losses it compares
# (NoiseCC is not part of this package).

# %%
table1 = {('l2', 'vgg19'): (98.7, 176.1), ('l2', 'csrnet'): (110.6, 190.1), ('l2', 'mcnn'): (186.4, 283.6),
          ('bl', 'vgg19'): (88.8, 154.8), ('bl', 'csrnet'): (107.5, 184.3), ('bl', 'mcnn'): (190.6, 272.3),
          ('dmcount', 'vgg19'): (85.6, 148.3), ('dmcount', 'csrnet'): (103.6, 180.6), ('dmcount', 'mcnn'): (176.1, 263.3),
          ('gl', 'vgg19'): (84.3, 147.5), ('gl', 'csrnet'): (92.0, 165.7), ('gl', 'mcnn'): (142.8, 227.9)}
rows = []
for (loss, model), (mae, mse) in table1.items():
    train, evaluate = commands('qnrf', model, loss)
    rows.append(dict(loss=loss, backbone=model, paper_mae=mae, paper_mse=mse, our_mae='', our_mse='', train=train, evaluate=evaluate))
t1 = pd.DataFrame(rows)
print(t1[['loss', 'backbone', 'paper_mae', 'paper_mse', 'our_mae', 'our_mse']].to_string(index=False))

# %%
print(t1.train[11]); print(t1.evaluate[11])

# %% [markdown]
# ## Table 3: VGG19 with the generalized loss on five datasets

# %%
table3 = {'nwpu': (79.3, 346.1), 'jhu': (59.9, 259.5), 'qnrf': (84.3, 147.5), 'shanghaitech-a': (61.3, 95.4),
          'shanghaitech-b': (7.3, 11.7)}
t3 = pd.DataFrame([dict(dataset=DATASETS[d], paper_mae=m, paper_mse=s, our_mae='', our_mse='',
                        train=commands(d, 'vgg19', 'gl')[0], evaluate=commands(d, 'vgg19', 'gl')[1]) for d, (m, s) in table3.items()])
print(t3[['dataset', 'paper_mae', 'paper_mse', 'our_mae', 'our_mse']].to_string(index=False))
for c in t3.train: print(c)

# %% [markdown]
# NWPU-Crowd's test labels are not public: its test figures come from the benchmark's server. Write the
# submission file with `uotcrowd predict --checkpoint runs/nwpu_vgg19_gl/best.pt DATA/NWPU-Crowd/images --nwpu --out nwpu_test`
# (the test image ids are listed in `test.txt`).
#
# ## Table 4: localization on NWPU-Crowd
#
# Precision, recall and F-measure with the benchmark's σ thresholds (the paper reports the σl figures of the
# test server). On the validation split they are computed locally by `uotcrowd.metrics.nwpu_localization` from the
# predictions written by `predict --nwpu` and the official `val_gt_loc.txt`.

# %%
t4 = pd.DataFrame([('Faster RCNN', 0.958, 0.035, 0.068), ('TinyFace', 0.529, 0.611, 0.567), ('VGG+GPR', 0.558, 0.496, 0.525),
                   ('RAZNet', 0.666, 0.543, 0.599), ('GL (paper)', 0.800, 0.562, 0.660)], columns=['method', 'precision', 'recall', 'f1'])
t4['ours'] = ['', '', '', '', 'uotcrowd eval --checkpoint runs/nwpu_vgg19_gl/best.pt --dataset nwpu --data-dir DATA --split val']
print(t4.to_string(index=False))

# %% [markdown]
# ## Table 5: localization on UCF-QNRF
#
# Precision, recall and AUC averaged over distance thresholds 1..100 px (`uotcrowd.metrics.qnrf_localization`;
# the protocol is documented on [the metrics page](../09_metrics.ipynb)). The three VGG19 rows are the models of
# Table 1.

# %%
t5 = pd.DataFrame([('VGG19+L2', 'l2', 0.605, 0.670, 0.623), ('VGG19+BL', 'bl', 0.767, 0.654, 0.720),
                   ('DM-Count', 'dmcount', 0.731, 0.638, 0.692), ('VGG19+GL', 'gl', 0.782, 0.748, 0.763)],
                  columns=['method', 'loss', 'paper_precision', 'paper_recall', 'paper_auc'])
t5['evaluate'] = [commands('qnrf', 'vgg19', l)[1] for l in t5.loss]
print(t5.drop(columns='evaluate').to_string(index=False))
