"""Gong et al. (nbs/14_gong.ipynb): the gradient-reversal sign of G's step through S (and S untouched by it), D's and S's
steps lowering their losses, G's loss as Eq. 8 weighs it, synthesis carrying M(x1) exactly and seeded, the paper's
Tables 1-4, resumable phases (stopped and resumed = uninterrupted; changed settings refused), the TCGA split helpers,
the two AJIs, and the smoke run."""
import copy, json
from smoke import run_smoke
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nucbook.augment.presynth import PreSynthConfig, presynthesize
from nucbook.bench.protocol import check_paper
from nucbook.data.crops import random_crop
from nucbook.data.datasets import tcga_organ
from nucbook.data.sample import check_sample, make_sample
from nucbook.data.synth import synth_dataset
from nucbook.engine.loop import SettingsMismatch
from nucbook.eval.metrics import evaluate
from nucbook.models.adain import ADAIN_PRESETS, AdaINGenerator, ImageDiscriminator, SkipDecoder, VGG19Encoder, adain_losses
from nucbook.models.hovernet import HoVerNet, hovernet_loss
from nucbook.methods.gong import (COMPARATOR, GONG_ROWS, GONG_TABLES, SEGMENTER, PairDataset, as_input, as_targets, corner_crops,
                                  d_step, g_loss, g_step, gong_scores, joint_train, organ_holdout, pretrain_gd, pretrain_s,
                                  s_loss, s_step, synthesize)

torch.set_num_threads(1)  # pytest -n 2 on 2 cores


def tiny_models(seed=0, enc_seed=0):
    "Tiny generator (offline random VGG-19 of `enc_seed`), discriminator and HoVer-Net, initialised with `seed`."
    torch.manual_seed(seed)
    gen = AdaINGenerator(VGG19Encoder(seed=enc_seed), SkipDecoder(**ADAIN_PRESETS['tiny']['decoder']))
    return gen, ImageDiscriminator(**ADAIN_PRESETS['tiny']['discriminator']), HoVerNet('tiny')


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def src():
    return synth_dataset(3, 'train', seed=2, size=96)


@pytest.fixture(scope='module')
def fb(src):
    "One fixed training batch (2 pairs of 48 px), as tensors."
    b = PairDataset(src, 1, 2, crop=48, seed=0)[0]
    return dict(x1=as_input(b['x1']), y1=as_targets(b, 'y1'), content=as_input(b['content']), style=as_input(b['x2']),
                m=as_targets(b, 'm'))


def seg_loss(gen, seg, fb):
    "S's loss (eval mode) on x̃ = G(ID(x1), x2) of the fixed batch: what G's step ascends."
    seg.eval()
    with torch.no_grad(): return float(hovernet_loss(seg(gen(fb['content'], fb['style'])[0].clamp(0, 1)), fb['m'])[0])


# ---- the three updates
def test_gradient_reversal_sign(fb):
    "G's step with only the L_s term raises S's loss on the batch and leaves S exactly as it was; S's step lowers it."
    gen, _, seg = tiny_models(1)
    opt_g = torch.optim.Adam(gen.decoder.parameters(), lr=1e-4)  # small enough for the first-order change to show (1e-3 overshoots)
    before, s0 = seg_loss(gen, seg, fb), state(seg)
    seg.train()
    _, x_tilde = g_step(gen, opt_g, fb['content'], fb['style'], segmenter=seg, targets=fb['m'], lam=0.0)
    assert same(s0, state(seg)) and seg.training and all(p.requires_grad for p in seg.parameters())
    assert all(p.grad is None for p in seg.parameters())  # no gradient reached S's parameters
    after = seg_loss(gen, seg, fb)
    assert after > before, (before, after)
    # S's step (with x̃ detached) lowers its loss and does not touch G
    g0, opt_s = state(gen.decoder), torch.optim.Adam(seg.parameters(), lr=1e-3)
    with torch.no_grad(): l0 = float(s_loss(seg.eval(), fb['x1'], fb['y1'], x_tilde, fb['m'])[0])
    for _ in range(3): s_step(seg, opt_s, fb['x1'], fb['y1'], x_tilde, fb['m'])
    with torch.no_grad(): l1 = float(s_loss(seg.eval(), fb['x1'], fb['y1'], x_tilde, fb['m'])[0])
    assert l1 < l0, (l0, l1)
    assert same(g0, state(gen.decoder))


def test_g_loss_is_eq8_and_lambda_lg_is_descended(fb):
    gen, disc, seg = tiny_models(3)
    disc.eval(); seg.eval()
    with torch.no_grad():
        loss, terms, _ = g_loss(gen, fb['content'], fb['style'], disc, seg, fb['m'], lam=10.0, gamma=0.5)
        xt, t = gen(fb['content'], fb['style'])
        Lg = adain_losses(gen.encoder, xt, t, fb['style'], gamma=0.5)['L_g']
        adv = -F.logsigmoid(disc(xt.clamp(0, 1))).mean()  # -log D(x̃): G ascends log D(x̃)
        Ls = hovernet_loss(seg(xt.clamp(0, 1)), fb['m'])[0]
    assert abs(float(loss) - float(adv - Ls + 10.0 * Lg)) < 1e-3 * max(1.0, abs(float(loss)))
    assert abs(terms['L_g'] - float(Lg)) < 1e-6 and abs(terms['L_s_syn'] - float(Ls)) < 1e-5
    # G's step on lambda L_g alone (no D, no S) lowers L_g
    opt = torch.optim.Adam(gen.decoder.parameters(), lr=1e-3)
    def lg():
        with torch.no_grad(): x_, t_ = gen(fb['content'], fb['style']); return float(adain_losses(gen.encoder, x_, t_, fb['style'])['L_g'])
    l0 = lg()
    for _ in range(3): g_step(gen, opt, fb['content'], fb['style'], lam=10.0)
    assert lg() < l0
    with pytest.raises(ValueError, match='needs the HoVer-Net targets of M'): g_loss(gen, fb['content'], fb['style'], segmenter=seg)


def test_d_step_lowers_d_loss(fb):
    "-log D(x2) - log(1 - D(x̃)), computed from D's logits, falls over D's steps on a fixed batch."
    gen, disc, _ = tiny_models(4)
    with torch.no_grad(): x_tilde = gen(fb['content'], fb['style'])[0]
    def objective():
        d = copy.deepcopy(disc).train()
        with torch.no_grad(): return float(-F.logsigmoid(d(fb['style'])).mean() - F.logsigmoid(-d(x_tilde)).mean())
    g0, opt = state(gen.decoder), torch.optim.Adam(disc.parameters(), lr=1e-3)
    l0 = objective()
    terms = [d_step(disc, opt, fb['style'], x_tilde) for _ in range(3)]
    assert objective() < l0, (l0, objective())
    assert abs(terms[0]['D'] - terms[0]['D_real'] - terms[0]['D_fake']) < 1e-6
    assert same(g0, state(gen.decoder))


# ---- synthesis
def test_synthesize_carries_m_exactly_and_is_seeded(src):
    gen = tiny_models(0)[0]
    syn, parts = synthesize(gen, src, 4, seed=7, crop=48, batch_size=3, generator_info={'phase': 'test'}, keep_inputs=True)
    for i, (s, p) in enumerate(zip(syn, parts)):
        check_sample(s)
        rng = np.random.default_rng([7, i]); j1, j2 = rng.integers(len(src), size=2)
        x1 = random_crop(src[j1], 48, rng); random_crop(src[j2], 48, rng)
        pre = presynthesize(x1, rng, PreSynthConfig())  # the draws as recorded: M(x1) recomputed
        assert np.array_equal(s.inst_map, pre.inst_map) and np.array_equal(p['content'], pre.image)
        assert np.array_equal(s.inst_types, pre.inst_types)
        m = s.meta['synthesis']
        assert (m['x1'], m['x2'], m['seed'], m['index'], m['encoder'], m['generator']) == \
            (src[j1].meta['image_id'], src[j2].meta['image_id'], 7, i, gen.encoder.name, {'phase': 'test'})
        assert 'offline default' in m['encoder']
    again = synthesize(gen, src, 4, seed=7, crop=48, batch_size=3)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.inst_map, b.inst_map) for a, b in zip(again, syn))
    other = synthesize(gen, src, 4, seed=8, crop=48, batch_size=3)
    assert not all(np.array_equal(a.inst_map, b.inst_map) for a, b in zip(other, syn))
    with pytest.raises(ValueError, match='give a crop side'): synthesize(gen, src + synth_dataset(1, 'train', seed=3, size=64), 6)


# ---- paper tables
def test_paper_tables():
    for t in GONG_TABLES.values(): check_paper(t)
    row = lambda t, r: next(x for x in GONG_TABLES[t]['rows'] if x['row'] == r)
    ours = row('table1', 'S (joint)')
    assert [ours[f'aji_gong_{g}'][0] for g in ('seen', 'unseen', 'all')] == [63.01, 66.13, 63.46]
    assert [ours[f'pixel_f1_{g}'][0] for g in ('seen', 'unseen', 'all')] == [81.59, 83.05, 81.80]
    assert [ours[f'object_f1_{g}'][0] for g in ('seen', 'unseen', 'all')] == [83.51, 84.34, 83.79]
    assert ours['segmenter'] == COMPARATOR and row('table1', 'Cell R-CNN v3')['aji_gong_unseen'] == [62.82, 9.24]
    assert row('table2', 'Mask R-CNN')['object_dice_all'] == [70.70, 5.98] and row('table3', 'S (joint)')['pixel_f1_all'] == [82.31, 1.37]
    assert row('table4', '+Ours (no adv)')['object_dice_all'] == [74.87, 3.25] and row('table4', 'CycleGan, adversarial training')['pixel_f1_all'] == [84.71, 1.18]
    assert GONG_TABLES['table1']['dataset'] == 'monuseg2018' and GONG_TABLES['table4']['dataset'] == 'cpm17'
    assert all(r['segmenter'] != SEGMENTER for t in GONG_TABLES.values() for r in t['rows'])  # never beside ours as comparable
    assert {r['row'] for r in GONG_TABLES['table4']['rows']} & set(GONG_ROWS) == set(GONG_ROWS) - {'S (pretrained)'}


# ---- resumable phases
def test_phase_resume_equals_uninterrupted_and_refuses_changed_settings(src, tmp_path):
    kw = dict(steps=3, batch_size=2, crop=32, lr=1e-3, seed=1)
    g_a, d_a, _ = tiny_models(5)
    whole = pretrain_gd(g_a, d_a, src, tmp_path/'a', **kw)
    assert whole.finished and whole.step == 3
    g_b, d_b, _ = tiny_models(5)
    stop = lambda loop, terms: loop.stop() if loop.step == 1 else None
    part = pretrain_gd(g_b, d_b, src, tmp_path/'b', callbacks=[stop], **kw)
    assert (part.finished, part.step) == (False, 1)
    g_b, d_b, _ = tiny_models(5)  # as a new process would: fresh nets, the checkpoint on disk
    rest = pretrain_gd(g_b, d_b, src, tmp_path/'b', **kw)
    assert rest.finished and rest.resumed_from == 1
    assert same(state(g_a.decoder), state(g_b.decoder)) and same(state(d_a), state(d_b))
    assert np.allclose(rest.history['G'], whole.history['G'], rtol=1e-6, atol=1e-6)
    for change in ({'lam': 1.0}, {'gamma': 0.25}, {'batch_size': 1}):
        with pytest.raises(SettingsMismatch) as e: pretrain_gd(*tiny_models(5)[:2], src, tmp_path/'a', **{**kw, **change})
        assert list(e.value.diffs) == list(change)
    with pytest.raises(SettingsMismatch, match='encoder'):  # another encoder: another run
        pretrain_gd(AdaINGenerator(VGG19Encoder(seed=9), g_a.decoder), d_a, src, tmp_path/'a', **kw)
    # S's pre-training, then joint training from both checkpoints (lr 0: it holds the pre-trained weights)
    seg = tiny_models(5)[2]
    assert pretrain_s(seg, src, tmp_path/'a', steps=2, batch_size=2, crop=32, seed=1).finished
    g_j, d_j, s_j = tiny_models(6)
    joint = joint_train(g_j, d_j, s_j, src, tmp_path/'a', steps=1, crop=32, lr=0.0, seed=1)
    params = lambda n: {k: v.detach().clone() for k, v in n.named_parameters()}
    for a, b in ((g_j.decoder, g_a.decoder), (d_j, d_a), (s_j, seg)): assert same(params(a), params(b))
    assert joint.settings['init']['pretrain_s'] == {'path': str(tmp_path/'a'/'pretrain_s'/'checkpoint.pt'), 'step': 2}
    assert not pretrain_s(tiny_models(5)[2], src, tmp_path/'c', steps=2, batch_size=2, crop=32, callbacks=[stop]).finished
    with pytest.raises(ValueError, match='pretrain_s stopped at step 1 of 2'):
        joint_train(g_j, d_j, s_j, src, tmp_path/'c', steps=1, crop=32, init_gd=whole.path)
    with pytest.raises(FileNotFoundError, match='no pretrain_s checkpoint'): joint_train(g_j, d_j, s_j, src, tmp_path/'b', steps=1, crop=32)


# ---- data and scores
def test_tcga_split_helpers():
    def tile(tid, seed=0):
        img = np.random.default_rng(seed).integers(150, 230, (100, 100, 3)).astype(np.uint8)
        inst = np.zeros((100, 100), np.int32); inst[10:20, 10:20] = 1; inst[45:56, 45:56] = 2; inst[85:95, 5:15] = 3
        return make_sample(img, inst, meta={'image_id': f'TCGA-{tid}-01Z-00-DX1'})
    tiles = [tile(t, i) for i, t in enumerate(['A7-A13E', '18-5592', 'A7-A13F', 'B0-5711', 'AR-A1AK', '21-5784'])]
    tr, va = organ_holdout(tiles, seed=0)
    assert sorted(tcga_organ(s.meta['image_id']) for s in va) == ['breast', 'kidney', 'liver'] and len(tr) == 3
    assert len({tuple(s.meta['image_id'] for s in organ_holdout(tiles, seed=k)[1]) for k in range(10)}) > 1
    cc = corner_crops(tiles[0], 60)
    assert [c.meta['crop'] for c in cc] == [(0, 0, 60, 60), (0, 40, 60, 60), (40, 0, 60, 60), (40, 40, 60, 60)]
    assert [c.n_instances for c in cc] == [2, 1, 2, 1] and np.array_equal(cc[3].image, tiles[0].image[40:, 40:])
    with pytest.raises(ValueError, match='a 512 px crop does not fit'): corner_crops(tiles[0], 512)


def test_two_ajis_differ_and_scores():
    t = np.zeros((10, 20), np.int32); t[2:8, 2:8] = 1; t[2:8, 12:18] = 2
    p = np.zeros_like(t); p[2:8, 2:18] = 1  # one prediction over both nuclei
    img = np.zeros((10, 20, 3), np.uint8)
    table = evaluate([make_sample(img, t, meta={'image_id': 'a', 'group': 'unseen'})], [make_sample(img, p, meta={'image_id': 'a'})],
                     extra=('aji_gong', 'object_dice'))
    sc = gong_scores(table)
    assert abs(sc['aji_gong_all'] - 100 * 36 / 132) < 1e-9 and abs(sc['aji_all'] - 100 * 72 / 192) < 1e-9  # used once vs twice
    assert sc['aji_gong_unseen'] == sc['aji_gong_all'] and sc['object_f1_all'] == 0.0
    with pytest.raises(KeyError, match='aji_gong'): gong_scores(evaluate([t], [p]))


def test_smoke_notebook_runs(tmp_path):
    "The smoke profile end to end (`make test` runs it): three phases, synthesis, Fig. 3, five rows, tables, metrics.json."
    m = run_smoke('14_gong', tmp_path)
    assert m['label'].startswith('SMOKE RUN') and 'NOT a reproduction' in m['label'] and 'offline default, not pretrained' in m['label']
    assert m['encoder'] == m['gan']['encoder']['name'] and 'offline default' in m['encoder']
    assert [row['row'] for row in m['results']] == GONG_ROWS
    for row in m['results']:
        assert {'aji_gong_all', 'aji_all', 'pixel_f1_all', 'object_f1_all', 'object_dice_all', 'aji_gong_seen', 'aji_gong_unseen'} <= set(row)
        assert all(0 <= row[k] <= 100 for k in row if k.endswith(('_all', '_seen', '_unseen')))
    assert m['phases']['steps'] == {'pretrain_gd': 60, 'pretrain_s': 8, 'joint': 6}
    assert m['synthesis']['n'] == 4 and [row['n_train'] for row in m['results'][:3]] == [4, 8, 8]
    t1 = m['table1']['S (joint)']
    assert t1['AJI all (Eqs. 10-11) | paper Mask R-CNN (ResNet-50 FPN + semantic branch) (monuseg2018: other dataset)'] == '63.46 ± 6.74'
    assert not any('paper' in k for k in m['table1']['Baseline'] if m['table1']['Baseline'][k])  # no paper number beside our baseline
    assert {'gong_fig3.png', 'gong_losses.png', 'gong_data.png', 'params.json'} <= {p.name for p in tmp_path.iterdir()}
