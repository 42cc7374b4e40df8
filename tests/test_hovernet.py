"HoVer-Net model, targets, losses and post-processing on hand-made inputs with known answers."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk
from nucbook.models.hovernet import (HoVerNet, HOVERNET_SIZES, dice_loss, hovernet_loss, hovernet_postprocess, hv_gradients,
                              hv_targets, load_encoder_weights, msge_loss, sobel_kernels)
from nucbook.data.sample import type_map_from_types


def test_model_shapes_and_sizes():
    for size in ('tiny', 'small'):
        out = HoVerNet(size, n_types=3).eval()(torch.rand(2, 3, 48, 64))
        assert {k: tuple(v.shape) for k, v in out.items()} == {'tp': (2, 4, 48, 64), 'np': (2, 2, 48, 64), 'hv': (2, 2, 48, 64)}
    assert set(HoVerNet('tiny')(torch.rand(1, 3, 32, 32))) == {'np', 'hv'}
    assert set(HOVERNET_SIZES) == {'tiny', 'small', 'paper'}
    with pytest.raises(ValueError, match='multiples of 8'): HoVerNet('tiny')(torch.rand(1, 3, 36, 32))
    with pytest.raises(ValueError, match='n_types'): HoVerNet('tiny', n_types=0)


def test_paper_encoder_is_resnet50():
    m = HoVerNet('paper')
    n_resnet = sum(p.numel() for name in ('conv0', 'd0', 'd1', 'd2', 'd3') for p in getattr(m, name).parameters())
    # torchvision's resnet50 without fc has 23,508,032 parameters; the preact layout differs only in BN placement
    assert abs(n_resnet - 23.5e6) < 0.1e6, n_resnet
    assert m.d3.units[0].conv2.stride == (2, 2) and len(m.d2.units) == 6


def test_encoder_weights_roundtrip(tmp_path):
    a, b = HoVerNet('tiny'), HoVerNet('tiny')
    torch.save({'desc': {k: v for k, v in a.state_dict().items() if k.startswith('d1.')}}, tmp_path/'w.tar')
    rep = load_encoder_weights(b, tmp_path/'w.tar')
    assert rep['loaded'] == len([k for k in a.state_dict() if k.startswith('d1.')])
    assert torch.equal(a.d1.units[0].conv1.weight, b.d1.units[0].conv1.weight)
    assert not torch.equal(a.d0.units[0].conv1.weight, b.d0.units[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match='not found'): load_encoder_weights(b, tmp_path/'missing.tar')


def test_hv_targets_exact():
    m = np.zeros((7, 7), np.int32); m[1:6, 2:5] = 4  # 5 rows x 3 cols, centroid (row 3, col 3)
    hv = hv_targets(m)
    assert np.array_equal(hv[0, 3, 2:5], [-1, 0, 1])
    assert np.allclose(hv[1, 1:6, 3], [-1, -0.5, 0, 0.5, 1])
    assert (hv[:, m == 0] == 0).all()
    # an L-shape: the centroid is off the pixel grid; extremes on each side are exactly +-1
    L = np.zeros((6, 6), np.int32); L[1:5, 1] = 1; L[4, 1:5] = 1
    hv = hv_targets(L)
    assert hv[0][L > 0].min() == -1 and hv[0][L > 0].max() == 1 and hv[1][L > 0].min() == -1


def test_sobel_and_msge_on_ramps():
    kx, ky = sobel_kernels(5)
    assert kx[2, 3] == 1 and kx[2, 4] == 0.5 and kx[0, 4] == pytest.approx(2 / 8) and torch.equal(ky, kx.T)
    ramp = torch.zeros(1, 2, 10, 10); ramp[0, 1] = 0.5 * torch.arange(10.)[:, None]  # v = 0.5 y
    g = hv_gradients(ramp)
    assert torch.allclose(g[0, 1, 2:-2, 2:-2], torch.full((6, 6), 6.0))  # 12 * 0.5
    focus = torch.zeros(1, 10, 10); focus[0, 3:7, 3:7] = 1
    assert msge_loss(ramp, torch.zeros_like(ramp), focus).item() == pytest.approx(36 / 2)
    assert msge_loss(ramp, ramp.clone(), focus).item() == 0


def test_dice_and_total_loss():
    tgt = torch.tensor([[[1, 1], [0, 0]]])
    probs = torch.tensor([[[[0.0, 0.0], [1, 1]], [[1.0, 1.0], [0, 0]]]])  # exactly right
    assert dice_loss(probs, tgt).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss(1 - probs, tgt, smooth=0).item() == pytest.approx(2.0)  # exactly wrong: 1 per class
    out = {'np': torch.zeros(1, 2, 2, 2), 'hv': torch.ones(1, 2, 2, 2)}
    total, terms = hovernet_loss(out, {'np': tgt, 'hv': torch.zeros(1, 2, 2, 2)})
    assert terms['np_ce'].item() == pytest.approx(np.log(2)) and terms['hv_mse'].item() == pytest.approx(1)
    assert set(terms) == {'np_ce', 'np_dice', 'hv_mse', 'hv_msge'}
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()))
    total2, _ = hovernet_loss(out, {'np': tgt, 'hv': torch.zeros(1, 2, 2, 2)}, {'hv_mse': 3.0})
    assert total2.item() == pytest.approx(total.item() + 2)


def test_loss_gradients_train_a_model():
    torch.manual_seed(0)
    m = HoVerNet('tiny'); opt = torch.optim.Adam(m.parameters(), 1e-2)
    inst = np.zeros((32, 32), np.int32); inst[disk((10, 10), 6)] = 1; inst[disk((22, 22), 6)] = 2
    x = torch.rand(1, 3, 32, 32); x[0, :, torch.from_numpy(inst > 0)] = 0.1
    tgt = {'np': torch.from_numpy(inst > 0)[None].long(), 'hv': torch.from_numpy(hv_targets(inst))[None]}
    first = None
    for _ in range(15):
        loss, _ = hovernet_loss(m(x), tgt); opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


def test_postprocess_separates_touching_nuclei():
    truth = np.zeros((80, 80), np.int32)
    for i, (cy, cx, r) in enumerate([(40, 28, 12), (40, 50, 11), (12, 12, 6)], start=1):
        truth[disk((cy, cx), r, shape=truth.shape)] = i
    inst, tmap, types = hovernet_postprocess((truth > 0).astype(float), hv_targets(truth))
    assert inst.max() == 3 and tmap is None and types is None
    for i in (1, 2, 3):  # each true nucleus is covered by one predicted instance with IoU > 0.9
        j = np.bincount(inst[truth == i]).argmax()
        assert j > 0 and ((truth == i) & (inst == j)).sum() / ((truth == i) | (inst == j)).sum() > 0.9
    # types by majority vote: a nucleus half type 2 and a quarter type 1 (rest background votes) is type 2
    tm = type_map_from_types(truth, np.array([3, 1, 2]))
    tm[(truth == 2) & (np.arange(80)[None] > 55)] = 4  # a minority of nucleus 2's pixels votes 4
    tp = np.eye(5)[tm].transpose(2, 0, 1)
    inst, tmap, types = hovernet_postprocess((truth > 0).astype(float), hv_targets(truth), tp)
    got = {i: types[np.bincount(inst[truth == i]).argmax() - 1] for i in (1, 2, 3)}
    assert got == {1: 3, 2: 1, 3: 2}


def test_postprocess_thresholds_and_errors():
    prob = np.zeros((40, 40)); prob[5:15, 5:15] = 0.6; prob[30:32, 30:32] = 0.9  # one nucleus and a 4-px speck
    inst, _, _ = hovernet_postprocess(prob, np.zeros((2, 40, 40)))
    assert inst.max() == 1 and (inst > 0).sum() == 100
    assert hovernet_postprocess(prob, np.zeros((2, 40, 40)), np_thresh=0.7)[0].max() == 0  # only the speck passes
    with pytest.raises(ValueError, match='hv has shape'): hovernet_postprocess(prob, np.zeros((40, 40)))
    with pytest.raises(ValueError, match='tp_prob'): hovernet_postprocess(prob, np.zeros((2, 40, 40)), np.zeros((3, 8, 8)))
