"""Tests of `uotcrowd.data` on the dataset fixtures: counts, coordinates, crops, flips, workers, broken files.

The copy in `tests/fixtures/` (ShanghaiTech part A and part B train, the UCF-QNRF/JHU/NWPU format files, NWPU's
localization files) lets these tests run the same on any clone, without `../shared`.
"""
import os, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from uotcrowd.data import (CrowdDataset, JHUCrowd, NWPUCrowd, ShanghaiTech, SyntheticCrowd, UCFQNRF, build_datasets,
                           collate, head_sigmas, holdout_split)
from uotcrowd.images import DatasetError, DatasetWarning, EvalTransform, TrainTransform, denormalize, normalize

LOCAL = Path(__file__).parent / 'fixtures'
FORMATS = LOCAL / 'formats'

# counts from tests/fixtures/README.md
SHA_COUNTS = {('train', 'IMG_1.jpg'): 1546, ('train', 'IMG_4.jpg'): 413, ('train', 'IMG_51.jpg'): 569,
              ('test', 'IMG_1.jpg'): 172, ('test', 'IMG_4.jpg'): 170, ('test', 'IMG_51.jpg'): 297}
SHB_COUNTS = {'IMG_9.jpg': 167, 'IMG_10.jpg': 229}


@pytest.fixture(scope='module')
def local():
    assert (LOCAL / 'ShanghaiTech').is_dir(), f'{LOCAL} is missing: it is part of the repository'
    return LOCAL


def gt_points(mat_path):
    return scipy.io.loadmat(str(mat_path))['image_info'][0, 0][0, 0][0].astype(np.float64)


# ---------------------------------------------------------------- counts and coordinates

def test_shanghaitech_part_a_counts_and_points(fixtures_dir):
    for split in ('train', 'test'):
        ds = ShanghaiTech(fixtures_dir / 'ShanghaiTech', 'A', split)
        assert len(ds) == 3
        for i in range(len(ds)):
            image, points, meta = ds[i]
            name = Path(meta['path']).name
            assert meta['count'] == len(points) == SHA_COUNTS[(split, name)]
            ref = gt_points(fixtures_dir / f'ShanghaiTech/part_A/{split}_data/ground-truth/GT_{Path(name).stem}.mat')
            np.testing.assert_allclose(points.numpy(), ref, atol=1e-3)
            with Image.open(meta['path']) as im: assert image.shape == (3, im.height, im.width)


def test_shanghaitech_part_b_local(local):
    ds = ShanghaiTech(local, 'B', 'train')                     # root one level above ShanghaiTech/: tolerated
    got = {Path(ds[i][2]['path']).name: ds[i][2]['count'] for i in range(len(ds))}
    assert got == SHB_COUNTS
    image, points, meta = ds[1]
    np.testing.assert_allclose(points.numpy(), gt_points(local / 'ShanghaiTech/part_B/train_data/ground-truth/GT_IMG_10.mat'), atol=1e-3)
    assert image.shape == (3, 768, 1024) and image.dtype == torch.float32


def test_grayscale_gives_three_channels(fixtures_dir):
    ds = ShanghaiTech(fixtures_dir / 'ShanghaiTech', 'A', 'train')
    image, points, meta = ds[[Path(r['image']).name for r in ds.records].index('IMG_4.jpg')]
    with Image.open(meta['path']) as im: assert im.mode == 'L'
    assert image.shape == (3, 746, 1024) and len(points) == 413
    assert torch.equal(image[0] * 0.229 + 0.485, image[1] * 0.224 + 0.456) or torch.allclose(
        image[0] * 0.229 + 0.485, image[1] * 0.224 + 0.456, atol=1e-5)   # the three channels carry the same grey


def test_formats_counts_and_coordinates(local):
    q = UCFQNRF(FORMATS / 'UCF-QNRF', 'train', short_side=None)
    assert [q[i][2]['count'] for i in range(2)] == [7, 12]
    assert [UCFQNRF(FORMATS / 'UCF-QNRF/UCF-QNRF_ECCV18', 'test', short_side=None)[i][2]['count'] for i in range(2)] == [7, 12]
    ref = scipy.io.loadmat(str(FORMATS / 'UCF-QNRF/UCF-QNRF_ECCV18/Train/img_0002_ann.mat'))['annPoints']
    np.testing.assert_allclose(q[1][1].numpy(), ref, atol=1e-4)
    for split in ('train', 'val', 'test'):
        j = JHUCrowd(FORMATS / 'JHU-Crowd', split, short_side=None)
        assert [j[i][2]['count'] for i in range(2)] == [5, 0]
        raw = np.loadtxt(FORMATS / f'JHU-Crowd/jhu_crowd_v2.0/{split}/gt/0001.txt')
        _, points, meta = j[0]
        np.testing.assert_allclose(points.numpy(), raw[:, :2]); np.testing.assert_allclose(meta['heads']['sizes'].numpy(), raw[:, 2:4])
        np.testing.assert_allclose(meta['heads']['occlusion'].numpy(), raw[:, 4])
    n = {s: NWPUCrowd(FORMATS / 'NWPU-Crowd', s, short_side=None) for s in ('train', 'val', 'test')}
    assert [n['train'][i][2]['count'] for i in range(2)] == [9, 4]
    assert [n['val'][i][2]['count'] for i in range(2)] == [6, 0]
    _, points, meta = n['test'][0]
    assert meta['count'] == -1 and points.shape == (0, 2) and meta['name'] == '0005'
    _, points, meta = n['val'][0]
    assert (meta['luminance'], meta['level']) == (1, 1)
    boxes = np.array(__import__('json').loads((FORMATS / 'NWPU-Crowd/jsons/0003.json').read_text())['boxes'])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    s_s, s_l = head_sigmas(meta['heads']['sizes'])
    np.testing.assert_allclose(s_s.numpy(), np.minimum(w, h) / 2, atol=1e-4)
    np.testing.assert_allclose(s_l.numpy(), np.sqrt(w ** 2 + h ** 2) / 2, atol=1e-4)


def test_resize_scales_points_and_boxes(local):
    small = NWPUCrowd(FORMATS / 'NWPU-Crowd', 'train', short_side=None)[0]
    big = NWPUCrowd(FORMATS / 'NWPU-Crowd', 'train', short_side=(300, 400))[0]     # 200×150 -> 400×300
    assert big[0].shape == (3, 300, 400)
    np.testing.assert_allclose(big[1].numpy(), small[1].numpy() * 2, atol=1e-3)
    np.testing.assert_allclose(big[2]['heads']['sizes'].numpy(), small[2]['heads']['sizes'].numpy() * 2, atol=1e-3)
    assert big[2]['scale'] == (2.0, 2.0)


def test_resize_cache_is_keyed_by_mtime(local, tmp_path):
    root = tmp_path / 'q'; shutil.copytree(FORMATS / 'UCF-QNRF', root)
    cache = tmp_path / 'cache'
    ds = UCFQNRF(root, 'train', short_side=(96, 128), cache_dir=cache)
    first = ds[0][0]
    assert len(list(cache.iterdir())) == 1
    assert torch.equal(ds[0][0], first)                            # read back from the cache
    img = root / 'UCF-QNRF_ECCV18/Train/img_0001.jpg'
    st = img.stat(); os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ds[0]
    assert len(list(cache.iterdir())) == 2                         # a changed file gets a new entry


# ---------------------------------------------------------------- transforms

def test_random_crops_keep_exactly_the_points_inside(local):
    ds = ShanghaiTech(local, 'B', 'train')
    full, pts, meta0 = ds.load(0)
    full_norm = normalize(full)
    tf = TrainTransform((200, 300), flip=True)
    g = torch.Generator().manual_seed(0)
    flips = set()
    for _ in range(25):
        image, points, meta = tf(full, pts, meta0, g)
        top, left, ch, cw = meta['crop']
        inside = (pts[:, 0] >= left) & (pts[:, 0] < left + cw) & (pts[:, 1] >= top) & (pts[:, 1] < top + ch)
        expected = pts[inside] - torch.tensor([left, top])
        window = full_norm[:, top:top + ch, left:left + cw]
        if meta['flipped']:
            expected = torch.stack([cw - expected[:, 0], expected[:, 1]], 1); window = window.flip(-1)
        flips.add(meta['flipped'])
        assert image.shape == (3, 200, 300) and meta['count'] == len(points) == int(inside.sum())
        torch.testing.assert_close(points, expected)
        torch.testing.assert_close(image, window)
    assert flips == {True, False}


def test_flip_mirrors_x(local):
    ds = ShanghaiTech(local, 'B', 'train')
    full, pts, meta = ds.load(1)
    W = full.shape[-1]
    g = torch.Generator().manual_seed(0)
    while True:                                                    # a full-size "crop": only the flip is random
        image, points, m = TrainTransform((768, 1024))(full, pts, meta, g)
        if m['flipped']: break
    torch.testing.assert_close(points[:, 0], W - pts[:, 0]); torch.testing.assert_close(points[:, 1], pts[:, 1])
    torch.testing.assert_close(image, normalize(full).flip(-1))


def test_small_images_are_padded_and_eval_pads_to_stride(local):
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    pts = torch.tensor([[10., 20.], [69.5, 49.5]])
    image, points, meta = TrainTransform(64, flip=False)(img[:, :, :60], pts - torch.tensor([[0., 0.], [10., 0.]]), {'count': 2})
    assert image.shape == (3, 64, 64) and image[:, 50:].abs().sum() == 0 and image[:, :, 60:].abs().sum() == 0
    torch.testing.assert_close(points, torch.tensor([[10., 20.], [59.5, 49.5]]))   # smaller than the crop: padded, points kept
    torch.testing.assert_close(image[:, :50, :60], normalize(img[:, :, :60]))
    image, points, meta = EvalTransform(16)(img, pts, {'count': 2})
    assert image.shape == (3, 64, 80) and torch.equal(points, pts) and (meta['height'], meta['width']) == (50, 70)
    assert image[:, :, 70:].abs().sum() == 0 and image[:, 50:].abs().sum() == 0


def test_denormalize_inverts_normalize():
    img = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    np.testing.assert_allclose(denormalize(normalize(img)), img.permute(0, 2, 3, 1).numpy() / 255, atol=1e-6)


# ---------------------------------------------------------------- build_datasets, splits, loaders

def test_build_datasets_real(local, fixtures_dir):
    tr, va, te = build_datasets('shanghaitech-a', fixtures_dir / 'ShanghaiTech', stride=8)
    assert (len(tr), len(va), len(te)) == (2, 1, 3)
    names_val = {va[i][2]['path'] for i in range(len(va))}
    names_tr = {tr[i][2]['path'] for i in range(len(tr))}
    assert not names_val & names_tr and all('train_data' in p for p in names_val | names_tr)
    assert all('test_data' in te[i][2]['path'] for i in range(len(te)))
    image, points, meta = va[0]
    assert image.shape[-2] % 8 == 0 and image.shape[-1] % 8 == 0 and meta['count'] == SHA_COUNTS[('train', Path(meta['path']).name)]
    assert tr[0][0].shape == (3, 256, 256)


def test_build_datasets_formats(local):
    tr, va, te = build_datasets('qnrf', FORMATS / 'UCF-QNRF', crop_size=128, val_fraction=0.5)
    assert (len(tr), len(va), len(te)) == (1, 1, 2) and tr[0][0].shape == (3, 128, 128)
    tr, va, te = build_datasets('jhu', FORMATS / 'JHU-Crowd', short_side=None, crop_size=64, stride=16)
    assert (len(tr), len(va), len(te)) == (2, 2, 2) and va[0][0].shape == (3, 128, 160)
    tr, va, te = build_datasets('nwpu', FORMATS / 'NWPU-Crowd', crop_size=64)
    assert [va[i][2]['count'] for i in range(2)] == [6, 0] and te[0][2]['count'] == -1


def test_build_datasets_errors(tmp_path):
    with pytest.raises(DatasetError, match='shanghaitech-a, shanghaitech-b, qnrf, jhu, nwpu, synthetic'): build_datasets('ucsd')
    with pytest.raises(DatasetError, match='expected layout'): build_datasets('jhu')
    with pytest.raises(DatasetError, match='part_A/train_data/images'): build_datasets('shanghaitech-a', tmp_path)
    with pytest.raises(DatasetError, match='does not exist'): build_datasets('nwpu', tmp_path / 'missing')


def test_holdout_split_is_fixed_and_disjoint():
    tr, va = holdout_split(300, 0.1, seed=3)
    assert len(va) == 30 and not set(tr) & set(va) and sorted(tr + va) == list(range(300))
    assert holdout_split(300, 0.1, seed=3) == (tr, va) and holdout_split(300, 0.1, seed=4)[1] != va
    assert holdout_split(2, 0.1) [1] and holdout_split(2, 0.1)[0]


def test_dataloader_two_workers_whole_epoch(local):
    tr, va, te = build_datasets('synthetic', n_train=12, n_val=4, n_test=4, size=96, crop_size=64, aug_seed=5)
    def epoch(workers):
        dl = torch.utils.data.DataLoader(tr, batch_size=4, collate_fn=collate, num_workers=workers)
        out = [(im, pts, [m['name'] for m in metas]) for im, pts, metas in dl]
        return out
    two = epoch(2)
    assert sum(len(n) for _, _, n in two) == 12 and len({x for _, _, n in two for x in n}) == 12
    assert all(im.shape == (4, 3, 64, 64) for im, _, _ in two)
    zero = epoch(0)                                                # same (aug_seed, epoch): same crops with any worker count
    for (a, pa, _), (b, pb, _) in zip(two, zero):
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(pa, pb))
    tr.set_epoch(1)
    assert not all(torch.equal(a, b) for (a, _, _), (b, _, _) in zip(epoch(0), zero))   # another epoch, other crops
    dl = torch.utils.data.DataLoader(ShanghaiTech(local, 'B', 'train', transform=TrainTransform(256)), batch_size=2,
                                     collate_fn=collate, num_workers=2)
    (images, points, metas), = list(dl)
    assert images.shape == (2, 3, 256, 256) and [m['count'] for m in metas] == [len(p) for p in points]


def test_global_torch_seed_reproduces_augmentation(local):
    ds = ShanghaiTech(local, 'B', 'train', transform=TrainTransform(128))
    torch.manual_seed(11); a = ds[0]
    torch.manual_seed(11); b = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- synthetic data

def test_synthetic_deterministic_and_varied():  # speed is not asserted: it depends on the load (05c_data prints it)
    ds = SyntheticCrowd(200, size=128, seed=0, cache=False)
    draws = [ds.generate(i) for i in range(200)]
    counts = np.array([len(p) for _, p in draws])
    assert counts.min() == 0 and counts.max() >= 100 and 30 < counts.mean() < 90
    again = SyntheticCrowd(200, size=128, seed=0)
    for i in (150, 3):                                             # any order gives the same images
        image, points = draws[i]
        a, pa, ma = again[i]
        assert torch.equal(torch.from_numpy(points).float(), pa) and ma['count'] == len(points)
        np.testing.assert_allclose(denormalize(a), image / 255, atol=1e-5)
    for _, p in draws[:50]:
        assert ((p >= 0) & (p < 128)).all()
    # perspective: heads are denser towards the top
    ys = np.concatenate([p[:, 1] for _, p in draws])
    assert (ys < 64).mean() > 0.55


def test_synthetic_splits_are_disjoint():
    tr, va, te = build_datasets('synthetic', n_train=5, n_val=5, n_test=5, size=64)
    imgs = [d[i][0] for d in (tr, va, te) for i in range(5)]
    assert not any(torch.equal(imgs[i], imgs[j]) for i in range(15) for j in range(i))


# ---------------------------------------------------------------- broken files

@pytest.fixture
def sht_copy(local, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(local / 'ShanghaiTech', root / 'ShanghaiTech')
    return root


def _part_b(root): return root / 'ShanghaiTech/part_B/train_data'


def test_corrupt_and_truncated_images_name_the_file(sht_copy):
    folder = _part_b(sht_copy)
    data = (folder / 'images/IMG_9.jpg').read_bytes()
    (folder / 'images/IMG_9.jpg').write_bytes(data[:len(data) // 2])        # truncated
    (folder / 'images/IMG_10.jpg').write_bytes(b'not a jpeg at all' * 10)    # corrupt
    ds = ShanghaiTech(sht_copy, 'B', 'train')
    with pytest.raises(DatasetError, match='IMG_9.jpg'): ds[[Path(r['image']).name for r in ds.records].index('IMG_9.jpg')]
    with pytest.raises(DatasetError, match='IMG_10.jpg'): ds[[Path(r['image']).name for r in ds.records].index('IMG_10.jpg')]


def test_malformed_mat_names_the_file(sht_copy):
    gt = _part_b(sht_copy) / 'ground-truth'
    (gt / 'GT_IMG_9.mat').write_text('garbage')
    scipy.io.savemat(str(gt / 'GT_IMG_10.mat'), {'something_else': np.zeros((3, 2))})
    ds = ShanghaiTech(sht_copy, 'B', 'train')
    idx = {Path(r['image']).name: i for i, r in enumerate(ds.records)}
    with pytest.raises(DatasetError, match='GT_IMG_9.mat'): ds[idx['IMG_9.jpg']]
    with pytest.raises(DatasetError, match='GT_IMG_10.mat'): ds[idx['IMG_10.jpg']]
    os.remove(gt / 'GT_IMG_10.mat')
    with pytest.raises(DatasetError, match='GT_IMG_10.mat'): ShanghaiTech(sht_copy, 'B', 'train')


def test_points_outside_and_nan_warn_with_the_file(sht_copy):
    gt = _part_b(sht_copy) / 'ground-truth/GT_IMG_9.mat'
    pts = np.array([[10., 20.], [5000., 30.], [np.nan, 4.], [-50., 700.], [1024.5, 100.]])
    info = np.empty((1, 1), dtype=object); inner = np.empty((1, 1), dtype=[('location', 'O'), ('number', 'O')])
    inner[0, 0] = (pts, np.array([[len(pts)]])); info[0, 0] = inner
    scipy.io.savemat(str(gt), {'image_info': info})
    ds = ShanghaiTech(sht_copy, 'B', 'train')
    i = [Path(r['image']).name for r in ds.records].index('IMG_9.jpg')
    with pytest.warns(DatasetWarning, match='GT_IMG_9.mat') as rec: _, points, meta = ds[i]
    assert len(rec) == 2                                           # one for NaN, one for the far points
    np.testing.assert_allclose(points.numpy(), [[10, 20], [1024 - 1e-3, 30], [0, 700], [1024 - 1e-3, 100]], atol=1e-4)
    ds.out_of_bounds = 'drop'
    with pytest.warns(DatasetWarning, match='GT_IMG_9.mat'): _, points, meta = ds[i]
    np.testing.assert_allclose(points.numpy(), [[10, 20], [1024 - 1e-3, 100]], atol=1e-4)   # 0.5 px outside: clipped
    ds.out_of_bounds = 'raise'
    with pytest.raises(DatasetError, match='GT_IMG_9.mat'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); ds[i]


def test_malformed_json_and_txt_name_the_file(local, tmp_path):
    nw = tmp_path / 'NWPU-Crowd'; shutil.copytree(FORMATS / 'NWPU-Crowd', nw)
    (nw / 'jsons/0001.json').write_text('{"points": [[1, 2], ')
    (nw / 'jsons/0002.json').write_text('{"points": [[1, 2, 3, "x"]]}')
    ds = NWPUCrowd(tmp_path, 'train', short_side=None)             # NWPU-Crowd/ one level down
    with pytest.raises(DatasetError, match='0001.json'): ds[0]
    with pytest.raises(DatasetError, match='0002.json'): ds[1]
    os.remove(nw / 'jsons/0003.json')
    with pytest.raises(DatasetError, match='0003.json'): NWPUCrowd(nw, 'val')
    (nw / 'test.txt').write_text('0005 bright x\n')
    with pytest.raises(DatasetError, match='test.txt'): NWPUCrowd(nw, 'test')
    jhu = tmp_path / 'jhu'; shutil.copytree(FORMATS / 'JHU-Crowd', jhu)
    (jhu / 'jhu_crowd_v2.0/train/gt/0001.txt').write_text('54 94 4 10 1 1\n105 oops 5 6 1 1\n')
    with pytest.raises(DatasetError, match='0001.txt'): JHUCrowd(jhu, 'train')[0]
    (jhu / 'jhu_crowd_v2.0/train/gt/0001.txt').write_text('54\n')
    with pytest.raises(DatasetError, match='0001.txt, line 1'): JHUCrowd(jhu, 'train')[0]


def test_missing_folders_explain_the_layout(tmp_path):
    (tmp_path / 'part_A').mkdir()
    with pytest.raises(DatasetError, match='no images'): ShanghaiTech(tmp_path, 'A', 'train')
    with pytest.raises(DatasetError, match='expected layout'): UCFQNRF(tmp_path, 'train')
    with pytest.raises(DatasetError, match='expected layout'): JHUCrowd(tmp_path, 'val')
    with pytest.raises(DatasetError, match='expected layout'): NWPUCrowd(tmp_path, 'val')
    with pytest.raises(DatasetError, match="UCF-QNRF split must be one of train, test, got 'val'"): UCFQNRF(tmp_path, 'val')


def test_collate_shapes_and_errors():
    ds = SyntheticCrowd(3, size=(48, 64))
    images, points, metas = collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 48, 64) and len(points) == len(metas) == 3
    assert all(torch.equal(p, ds[i][1]) for i, p in enumerate(points))
    with pytest.raises(ValueError, match='different sizes'): collate([ds[0], SyntheticCrowd(1, size=32)[0]])
