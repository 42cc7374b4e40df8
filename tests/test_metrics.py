"""Tests of nucbook.eval.metrics: hand-computed values, edge cases, symmetry, and agreement with a straightforward
per-instance implementation of HoVer-Net's definitions written here."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from nucbook.eval import metrics as M
from nucbook.eval.metrics import (dice1, dice2, aji, aji_plus, pq, object_f1, pixel_f1, instance_metrics, overlaps,
                             classification_stats, pair_centroids, class_pq_counts, class_pq, pooled_class_pq,
                             evaluate, remap_ids, CONVENTIONS, resolve_conventions, class_counts, count_r2,
                             aji_gong, object_dice, average_precision, AP_THRESHOLDS, AP_KEYS, EXTRA_METRICS)
from nucbook.data.sample import Sample, LabelError, make_sample, instance_centroids


# ---------------------------------------------------------------- per-instance reference (one mask per instance)
def ref_remap(m):
    out = np.zeros(m.shape, np.int64)
    for k, i in enumerate(sorted(set(np.unique(m).tolist()) - {0}), start=1): out[m == i] = k
    return out

def ref_tables(true, pred):
    true, pred = ref_remap(true), ref_remap(pred)
    nt, npr = int(true.max()), int(pred.max())
    inter = np.zeros((nt, npr)); union = np.zeros((nt, npr))
    for i in range(1, nt + 1):
        t = true == i
        for j in np.unique(pred[t]):
            if j == 0: continue
            p = pred == j
            inter[i - 1, j - 1] = (t & p).sum(); union[i - 1, j - 1] = (t | p).sum()
    at = np.array([(true == i).sum() for i in range(1, nt + 1)], float)
    ap = np.array([(pred == j).sum() for j in range(1, npr + 1)], float)
    return true, pred, inter, union, at, ap

def ref_dice1(true, pred):
    t, p = true > 0, pred > 0
    return 2 * (t & p).sum() / (t.sum() + p.sum())

def ref_dice2(true, pred):
    _, _, inter, union, at, ap = ref_tables(true, pred)
    tot = ins = 0.0
    for i in range(inter.shape[0]):
        for j in range(inter.shape[1]):
            if inter[i, j] > 0: tot += at[i] + ap[j]; ins += inter[i, j]
    return 2 * ins / tot

def ref_aji(true, pred):
    _, _, inter, union, at, ap = ref_tables(true, pred)
    iou = inter / (union + 1e-6)
    I = U = 0.0; used = set(); paired = set()
    for i in range(iou.shape[0]):
        if iou.shape[1] == 0: break
        j = int(np.argmax(iou[i]))
        if iou[i, j] > 0: I += inter[i, j]; U += union[i, j]; used.add(j); paired.add(i)
    U += sum(at[i] for i in range(len(at)) if i not in paired) + sum(ap[j] for j in range(len(ap)) if j not in used)
    return I / U

def ref_aji_plus(true, pred):
    _, _, inter, union, at, ap = ref_tables(true, pred)
    iou = inter / (union + 1e-6)
    r, c = linear_sum_assignment(-iou)
    ok = iou[r, c] > 0; r, c = r[ok], c[ok]
    U = union[r, c].sum() + sum(at[i] for i in range(len(at)) if i not in set(r)) + \
        sum(ap[j] for j in range(len(ap)) if j not in set(c))
    return inter[r, c].sum() / U

def ref_pq_pairs(true, pred, thr=0.5, match='>'):
    _, _, inter, union, at, ap = ref_tables(true, pred)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    hit = ((iou > thr) if match == '>' else (iou >= thr)) & (inter > 0)  # a TP pair must overlap
    if thr >= 0.5:  # the most one-to-one pairs among the hits (all of them, except halves tied at IoU >= 0.5)
        r, c = linear_sum_assignment(-hit.astype(float)); ok = hit[r, c]; r, c = r[ok], c[ok]
    else:  # HoVer-Net: Hungarian on IoU, then the threshold
        r, c = linear_sum_assignment(-iou); ok = hit[r, c]; r, c = r[ok], c[ok]
    return len(r), len(ap) - len(r), len(at) - len(r), iou[r, c].sum()

def ref_pq(true, pred, thr=0.5, match='>'):
    tp, fp, fn, s = ref_pq_pairs(true, pred, thr, match)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = s / (tp + 1e-6)
    return dq, sq, dq * sq


# ---------------------------------------------------------------- random fields
def blob_field(rng, shape=(48, 48), n=12, ids=None):
    "Overlapping random rectangles and discs painted in turn (later ones occlude), ids non-contiguous."
    m = np.zeros(shape, np.int64)
    yy, xx = np.indices(shape)
    ids = rng.choice(np.arange(1, 10_000), n, replace=False) if ids is None else ids
    for i in ids:
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1]); r = rng.integers(2, 7)
        if rng.random() < 0.5: m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
        else: m[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r] = i
    return m

def perturb(rng, m):
    "Shift, drop, relabel: a prediction-like copy."
    p = np.roll(m, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1)).copy()
    ids = np.unique(p); ids = ids[ids > 0]
    for i in ids:
        u = rng.random()
        if u < 0.15: p[p == i] = 0
        elif u < 0.3:  # split
            ys, xs = np.nonzero(p == i); cut = xs < np.median(xs); p[ys[cut], xs[cut]] = i + 20_000
    lut = {i: rng.integers(1, 50_000) for i in np.unique(p) if i > 0}
    return np.vectorize(lambda v: lut.get(v, 0))(p) if lut else p


@pytest.mark.parametrize('seed', range(12))
def test_random_fields_match_reference(seed):
    rng = np.random.default_rng(seed)
    t = blob_field(rng); p = perturb(rng, t) if seed % 3 else blob_field(rng)
    m = instance_metrics(t, p)
    assert m['dice1'] == pytest.approx(ref_dice1(t, p), abs=1e-9)
    assert m['dice2'] == pytest.approx(ref_dice2(t, p), abs=1e-9)
    assert m['aji'] == pytest.approx(ref_aji(t, p), abs=1e-9)
    assert m['aji_plus'] == pytest.approx(ref_aji_plus(t, p), abs=1e-9)
    np.testing.assert_allclose([m['dq'], m['sq'], m['pq']], ref_pq(t, p), atol=1e-9)
    np.testing.assert_allclose(pq(t, p, 0.3), ref_pq(t, p, 0.3), atol=1e-9)
    for thr in (0.5, 0.3):
        np.testing.assert_allclose(pq(t, p, thr, match='>='), ref_pq(t, p, thr, '>='), atol=1e-9)
    assert dice1(t, p) == m['dice1'] and aji(t, p) == m['aji'] and aji_plus(t, p) == m['aji_plus']


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.int64, (5, 6), elements=st.integers(0, 5)), arrays(np.int64, (5, 6), elements=st.integers(0, 5)))
def test_noise_fields_match_reference_including_ties(t, p):
    # tiny noisy maps are full of exact IoU ties: tie-breaking must follow the reference too
    if not t.any() or not p.any(): return
    if not ((t > 0) & (p > 0)).any():  # the reference divides by zero here; we return 0
        assert dice2(t, p) == 0.0 and aji(t, p) == 0.0; return
    assert aji(t, p) == pytest.approx(ref_aji(t, p), abs=1e-9)
    assert aji_plus(t, p) == pytest.approx(ref_aji_plus(t, p), abs=1e-9)
    assert dice2(t, p) == pytest.approx(ref_dice2(t, p), abs=1e-9)
    np.testing.assert_allclose(pq(t, p), ref_pq(t, p), atol=1e-9)
    np.testing.assert_allclose(pq(t, p, 0.2), ref_pq(t, p, 0.2), atol=1e-9)
    # '>=' on maps full of IoUs of exactly 0.5 (halves): still one-to-one, as the maximum matching of the reference
    np.testing.assert_allclose(pq(t, p, match='>='), ref_pq(t, p, match='>='), atol=1e-9)
    np.testing.assert_allclose(pq(t, p, 0.2, match='>='), ref_pq(t, p, 0.2, '>='), atol=1e-9)


def test_sparse_table_matches_dense(monkeypatch):
    rng = np.random.default_rng(5)
    t = blob_field(rng, (64, 64), 25); p = perturb(rng, t)
    dense = instance_metrics(t, p)
    monkeypatch.setattr(M, 'DENSE_TABLE_LIMIT', 0)
    assert instance_metrics(t, p) == dense


def test_grouped_hungarian_fallback_matches(monkeypatch):
    rng = np.random.default_rng(7)
    t = blob_field(rng, (64, 64), 25); p = perturb(rng, t)
    dense = (aji_plus(t, p), pq(t, p, 0.25))
    monkeypatch.setattr(M, 'DENSE_LSA_LIMIT', 0)
    assert aji_plus(t, p) == pytest.approx(dense[0], abs=1e-12)
    np.testing.assert_allclose(pq(t, p, 0.25), dense[1], atol=1e-12)


# ---------------------------------------------------------------- hand-built maps
def square(m, y, x, h, w, i): m[y:y + h, x:x + w] = i; return m

def test_identical():
    t = np.zeros((10, 10), np.int32); square(t, 0, 0, 2, 2, 1); square(t, 4, 0, 2, 3, 2); square(t, 6, 6, 3, 3, 3)
    m = instance_metrics(t, t)
    assert (m['dice1'], m['dice2'], m['aji'], m['aji_plus'], m['dq'], m['object_f1']) == (1, 1, 1, 1, 1, 1)
    assert m['sq'] == pytest.approx(0.9999996667, abs=1e-10)  # 3 / (3 + 1e-6): the reference's epsilon
    assert m['pq'] == m['sq']

def test_split_and_merge():
    t = square(np.zeros((6, 7), np.int32), 1, 1, 4, 5, 1)                    # one 20 px nucleus
    p = square(square(np.zeros_like(t), 1, 1, 4, 3, 3), 1, 4, 4, 2, 8)      # split 12 + 8
    assert dice1(t, p) == 1.0
    assert dice2(t, p) == pytest.approx(2 * 20 / (32 + 28))
    assert aji(t, p) == pytest.approx(12 / 28) and aji_plus(t, p) == pytest.approx(12 / 28)
    dq, sq, pq_ = pq(t, p)
    assert (dq, sq) == (pytest.approx(2 / 3), pytest.approx(0.6 / (1 + 1e-6)))
    assert pq_ == pytest.approx(0.4 / (1 + 1e-6))
    # merged (the transpose): AJI reuses the prediction -> 20 / 40, AJI+ does not -> 12 / 28
    assert aji(p, t) == pytest.approx(0.5) and aji_plus(p, t) == pytest.approx(12 / 28)
    assert aji(t, p) != aji(p, t)  # AJI is not symmetric

def test_shift_false_positive_and_miss():
    t = np.zeros((12, 12), np.int32); square(t, 1, 1, 4, 4, 4); square(t, 8, 8, 3, 3, 9)
    p = np.zeros_like(t); square(p, 1, 2, 4, 4, 2); square(p, 8, 1, 2, 2, 6)
    m = instance_metrics(t, p)
    assert (m['tp'], m['fp'], m['fn']) == (1, 1, 1)
    assert m['dice1'] == pytest.approx(24 / 45) and m['pixel_f1'] == m['dice1']
    assert m['dice2'] == pytest.approx(24 / 32)
    assert m['aji'] == pytest.approx(12 / 33) and m['aji_plus'] == pytest.approx(12 / 33)
    assert m['dq'] == 0.5 and m['object_f1'] == 0.5
    assert m['sq'] == pytest.approx(0.6 / (1 + 1e-6), abs=1e-12)

def test_iou_exactly_half():
    t = square(np.zeros((4, 4), np.int32), 0, 0, 2, 2, 1)   # 4 px
    p = square(np.zeros_like(t), 0, 0, 2, 4, 1)             # 8 px containing it: IoU = 4 / 8
    assert pq(t, p) == (0.0, 0.0, 0.0)                      # strictly above 0.5 is needed
    assert object_f1(t, p) == 0.0
    dq, sq, _ = pq(t, p, iou_threshold=0.49)
    assert dq == 1.0 and sq == pytest.approx(0.5 / (1 + 1e-6), abs=1e-12)
    assert aji(t, p) == pytest.approx(0.5) and dice1(t, p) == pytest.approx(8 / 12)

def test_non_contiguous_ids_do_not_matter():
    t = np.zeros((12, 12), np.int64); square(t, 1, 1, 4, 4, 4); square(t, 8, 8, 3, 3, 9)
    p = np.zeros_like(t); square(p, 1, 2, 4, 4, 2); square(p, 8, 1, 2, 2, 6)
    base = instance_metrics(t, p)
    t2 = np.where(t == 4, 70_000, np.where(t == 9, 3, 0)); p2 = np.where(p == 2, 2**40, np.where(p == 6, 11, 0))
    assert instance_metrics(t2, p2) == base
    assert instance_metrics(t.astype(np.uint16), p.astype(np.uint8)) == base

def test_edge_cases_never_raise():
    t = square(np.zeros((8, 8), np.int32), 2, 2, 3, 3, 5); z = np.zeros_like(t)
    for a, b in [(t, z), (z, t)]:  # one map empty: everything 0
        m = instance_metrics(a, b)
        assert [m[k] for k in M.INSTANCE_METRICS] == [0.0] * len(M.INSTANCE_METRICS)
    m = instance_metrics(z, z)  # both empty: NaN = nothing to measure
    assert all(np.isnan(m[k]) for k in M.INSTANCE_METRICS)
    # no overlap at all between non-empty maps: 0 (the reference raises ZeroDivisionError for Dice-2)
    p = square(np.zeros_like(t), 6, 6, 2, 2, 1)
    assert dice2(t, p) == 0.0 and aji(t, p) == 0.0 and aji_plus(t, p) == 0.0 and pq(t, p) == (0.0, 0.0, 0.0)

def test_bad_input_raises():
    t = np.zeros((4, 4), np.int32)
    with pytest.raises(LabelError, match='shape'): dice1(t, np.zeros((4, 5), np.int32))
    with pytest.raises(LabelError, match='negative'): aji(t, t - 1)
    with pytest.raises(LabelError, match='integer'): pq(t, t.astype(float))
    with pytest.raises(ValueError, match='iou_threshold'): pq(t, t, iou_threshold=-0.1)

def test_symmetry_where_it_holds():
    rng = np.random.default_rng(3)
    for _ in range(5):
        t = blob_field(rng); p = perturb(rng, t)
        assert dice1(t, p) == dice1(p, t) and dice2(t, p) == pytest.approx(dice2(p, t), abs=1e-12)
        np.testing.assert_allclose(pq(t, p), pq(p, t), atol=1e-12)
        assert object_f1(t, p) == object_f1(p, t)
        assert aji_plus(t, p) == pytest.approx(aji_plus(p, t), abs=1e-9)  # same optimum (no ties on blobs)

def test_remap_keeps_order():
    r, ids = remap_ids(np.array([[9, 0], [3, 2**33]]))
    assert ids.tolist() == [3, 9, 2**33] and r.tolist() == [[2, 0], [1, 3]]


# ---------------------------------------------------------------- classification statistics
E = (np.zeros((0, 2)), np.zeros(0))

def test_pooled_classification_by_hand():
    true_pts = [([[10, 10], [50, 50], [90, 90]], [1, 2, 1]), ([[20, 20]], [2]), E, E]
    pred_pts = [([[12, 10], [50, 55], [200, 200]], [1, 1, 2]), E, ([[30, 30]], [2]), E]
    s = classification_stats(true_pts, pred_pts)
    # paired: (1,1) 2 px and (2,1) 5 px; FN: type 1 (90,90), type 2 image B; FP: type 2 (200,200), type 2 image C
    assert (s['tp_d'], s['fp_d'], s['fn_d']) == (2, 2, 2)
    assert s['f1_d'] == 0.5 and s['acc'] == 0.5
    assert s['f1_c_1'] == pytest.approx(2 / (2 + 2 * 1 + 1))   # TP 1, FP_c 1, FN_d 1
    assert s['f1_c_2'] == 0.0                                  # FN_c 1, FP_d 2, FN_d 1
    assert set(k for k in s if k.startswith('f1_c')) == {'f1_c_1', 'f1_c_2'}  # no placeholder type 0

def test_empty_image_has_no_placeholder():
    # the reference would put a pred placeholder at (0,0) and pair it with this nucleus 7 px away
    s = classification_stats([([[5, 5]], [1])], [E])
    assert (s['tp_d'], s['fp_d'], s['fn_d'], s['f1_d']) == (0, 0, 1, 0.0) and np.isnan(s['acc'])
    s = classification_stats([E], [([[5, 5]], [3])])
    assert (s['tp_d'], s['fp_d'], s['fn_d'], s['f1_d']) == (0, 1, 0, 0.0)
    assert np.isnan(classification_stats([E, E], [E, E])['f1_d'])

def test_pairing_radius_and_reference_quirk():
    pairs, ut, up = pair_centroids([[0, 0]], [[12, 0]]); assert pairs.tolist() == [[0, 0]]  # 12 px is in
    pairs, ut, up = pair_centroids([[0, 0]], [[12.01, 0]]); assert len(pairs) == 0
    # the assignment is solved on unbounded distances then filtered, as in the reference
    pairs, ut, up = pair_centroids([[0, 0], [12, 1]], [[12, 0], [12, 13]])
    assert pairs.tolist() == [[1, 0]] and ut.tolist() == [0] and up.tolist() == [1]

def ref_type_stats(true_pts, pred_pts, types):
    pt, pp, ut, up = [], [], [], []
    for (txy, tty), (pxy, pty) in zip(true_pts, pred_pts):
        txy, pxy = np.asarray(txy, float).reshape(-1, 2), np.asarray(pxy, float).reshape(-1, 2)
        d = np.array([[np.hypot(*(a - b)) for b in pxy] for a in txy]).reshape(len(txy), len(pxy))
        r, c = linear_sum_assignment(d) if d.size else (np.zeros(0, int), np.zeros(0, int))
        keep = [(i, j) for i, j in zip(r, c) if d[i, j] <= 12]
        pt += [tty[i] for i, _ in keep]; pp += [pty[j] for _, j in keep]
        ut += [tty[i] for i in range(len(txy)) if i not in {a for a, _ in keep}]
        up += [pty[j] for j in range(len(pxy)) if j not in {b for _, b in keep}]
    pt, pp, ut, up = map(np.array, (pt, pp, ut, up))
    out = dict(f1_d=2 * len(pt) / (2 * len(pt) + len(up) + len(ut)), acc=(pt == pp).mean())
    for c in types:
        sel = (pt == c) | (pp == c); a, b = pt[sel], pp[sel]
        tp, fp, fn = ((a == c) & (b == c)).sum(), ((a != c) & (b == c)).sum(), ((a == c) & (b != c)).sum()
        out[f'f1_c_{c}'] = 2 * tp / (2 * tp + 2 * fp + 2 * fn + (up == c).sum() + (ut == c).sum())
    return out

def test_classification_matches_reference_on_random_points():
    rng = np.random.default_rng(0)
    true_pts, pred_pts = [], []
    for _ in range(6):
        n = rng.integers(5, 40); xy = rng.uniform(0, 200, (n, 2)); ty = rng.integers(1, 5, n)
        keep = rng.random(n) < 0.8
        pxy = np.concatenate([xy[keep] + rng.normal(0, 4, (keep.sum(), 2)), rng.uniform(0, 200, (3, 2))])
        pty = np.concatenate([np.where(rng.random(keep.sum()) < 0.7, ty[keep], rng.integers(1, 5, keep.sum())),
                              rng.integers(1, 5, 3)])
        true_pts.append((xy, ty)); pred_pts.append((pxy, pty))
    s = classification_stats(true_pts, pred_pts); r = ref_type_stats(true_pts, pred_pts, [1, 2, 3, 4])
    for k, v in r.items(): assert s[k] == pytest.approx(v, abs=1e-12), k


# ---------------------------------------------------------------- per-class PQ
def test_class_pq_equals_pq_of_class_restricted_maps():
    rng = np.random.default_rng(11)
    for thr in (0.5, 0.3):
        t = blob_field(rng, n=16); p = perturb(rng, t)
        tt = rng.integers(1, 4, len(remap_ids(t)[1])); pt = rng.integers(1, 4, len(remap_ids(p)[1]))
        cnt = class_pq_counts(overlaps(t, p), tt, pt, [1, 2, 3], thr)
        rt, rp = remap_ids(t)[0], remap_ids(p)[0]
        for k, c in enumerate([1, 2, 3]):
            tc = np.where(np.isin(rt, np.flatnonzero(tt == c) + 1), rt, 0)
            pc = np.where(np.isin(rp, np.flatnonzero(pt == c) + 1), rp, 0)
            tp, fp, fn, s = ref_pq_pairs(tc, pc, thr)
            np.testing.assert_allclose(cnt[k], [tp, fp, fn, s], atol=1e-12)

def test_class_pq_pannuke_and_conic_by_hand():
    # class 1: TP 1 (IoU 1), FN 1; class 2: FP 1 only (no true nucleus: NaN in PanNuke, 0 in CoNIC)
    cnt = np.array([[1, 0, 1, 1.0], [0, 1, 0, 0.0]])
    pqc = class_pq(cnt)
    assert pqc[0] == pytest.approx((1 / 1.5) / (1 + 1e-6)) and np.isnan(pqc[1])
    pooled = pooled_class_pq(cnt)
    assert pooled[0] == pytest.approx((1 / (1.5 + 1e-6)) / (1 + 1e-6)) and pooled[1] == 0.0


# ---------------------------------------------------------------- evaluate
def _sample(inst, types, group=None, name='x'):
    meta = {'image_id': name} | ({'group': group} if group else {})
    return make_sample(np.zeros(inst.shape + (3,), np.uint8), inst, inst_types=types, meta=meta)

def test_evaluate_samples_groups_and_pooled_row():
    t1 = np.zeros((16, 16), np.int32); square(t1, 1, 1, 4, 4, 1); square(t1, 8, 8, 4, 4, 2)
    p1 = np.zeros_like(t1); square(p1, 1, 1, 4, 4, 1); square(p1, 8, 9, 4, 4, 2)   # 2nd shifted (IoU 12/20)
    t2 = np.zeros_like(t1); square(t2, 2, 2, 5, 5, 1)
    trues = [_sample(t1, [1, 2], 'seen', 'a'), _sample(t2, [2], 'unseen', 'b'), _sample(np.zeros_like(t1), [], 'seen', 'c')]
    preds = [_sample(p1, [1, 1], name='a'), _sample(np.zeros_like(t1), []), _sample(np.zeros_like(t1), [])]
    df = evaluate(trues, preds)
    assert df.kind.tolist() == ['image'] * 3 + ['mean'] * 3 + ['pooled'] * 3
    assert df.image.tolist()[:3] == ['a', 'b', 'c'] and df.group.tolist()[:3] == ['seen', 'unseen', 'seen']
    img = df[df.kind == 'image'].set_index('image')
    assert img.loc['a', 'dq'] == 1.0 and img.loc['b', 'pq'] == 0.0 and np.isnan(img.loc['c', 'pq'])
    mean_all = df[(df.kind == 'mean') & (df.group == 'all')].iloc[0]
    assert mean_all.pq == pytest.approx((img.loc['a', 'pq'] + 0.0) / 2)  # image c (both empty) left out
    assert mean_all.n_images == 3
    pooled = df[(df.kind == 'pooled') & (df.group == 'all')].iloc[0]
    # pairs: (1,1) ok and (2,1) wrong type; FN: image b's type-2 nucleus
    assert (pooled.tp_d, pooled.fp_d, pooled.fn_d) == (2, 0, 1)
    assert pooled.f1_d == pytest.approx(4 / 5) and pooled.acc == 0.5
    assert pooled.f1_c_1 == pytest.approx(2 / (2 + 2)) and pooled.f1_c_2 == 0.0
    # PanNuke per-image class PQ, image a: class 1 TP 1 (IoU 1) + FP 1 (the mistyped prediction);
    # class 2 has a true nucleus but no type-2 prediction -> 0
    assert img.loc['a', 'pq_1'] == pytest.approx((1 / 1.5) / (1 + 1e-6), abs=1e-12) and img.loc['a', 'pq_2'] == 0.0
    assert img.loc['a', 'mpq'] == pytest.approx(img.loc['a', 'pq_1'] / 2) and img.loc['a', 'bpq'] == img.loc['a', 'pq']
    assert np.isnan(img.loc['b', 'pq_1']) and img.loc['b', 'pq_2'] == 0.0  # PanNuke skips classes absent from truth
    assert np.isnan(img.loc['c', 'mpq']) and np.isnan(img.loc['c', 'bpq'])
    # CoNIC mPQ+: class 1 TP 1 (IoU 1), FP 1 (the wrongly typed prediction); class 2 TP 0
    assert pooled.pq_plus_1 == pytest.approx((1 / (1.5 + 1e-6)) / (1 + 1e-6)) and pooled.pq_plus_2 == 0.0
    assert pooled.mpq_plus == pytest.approx(pooled.pq_plus_1 / 2)

def test_evaluate_arrays_with_type_maps_and_errors():
    t = np.zeros((16, 16), np.int32); square(t, 1, 1, 4, 4, 7); square(t, 8, 8, 4, 4, 3)
    tmap = np.where(t == 7, 2, np.where(t == 3, 1, 0))
    df = evaluate([t], [t], types=([tmap], [np.array([1, 2])]))  # per-instance types in sorted-id order (3, 7)
    pooled = df.iloc[-1]
    assert pooled.kind == 'pooled' and pooled.f1_d == 1.0 and pooled.acc == 1.0 and 'group' not in df
    df = evaluate([t], [t])
    assert df.kind.tolist() == ['image', 'mean'] and 'f1_d' not in df
    with pytest.raises(ValueError, match='1 true images but 2'): evaluate([t], [t, t])
    with pytest.raises(LabelError, match='types'): evaluate([t], [t], types=([np.array([1])], [np.array([1, 2])]))
    df = evaluate([t, np.zeros_like(t)], [t, t], names=['u', 'v'], groups=['g1', 'g2'])
    assert df.image.tolist()[:2] == ['u', 'v'] and set(df.group) == {'g1', 'g2', 'all'}


# ---------------------------------------------------------------- conventions: '>' vs '>=', empty images, presets
def test_match_at_exactly_the_threshold():
    t = square(np.zeros((4, 4), np.int32), 0, 0, 2, 2, 1)   # 4 px
    p = square(np.zeros_like(t), 0, 0, 2, 4, 1)             # 8 px containing it: IoU exactly 0.5
    assert pq(t, p) == (0.0, 0.0, 0.0) and pq(t, p, match='>') == (0.0, 0.0, 0.0)
    dq, sq, pq_ = pq(t, p, match='>=')
    assert dq == 1.0 and sq == pytest.approx(0.5 / (1 + 1e-6), abs=1e-15) and pq_ == dq * sq
    assert object_f1(t, p) == 0.0 and object_f1(t, p, match='>=') == 1.0
    # above 0.5: the 12 px piece of a 20 px nucleus has IoU exactly 0.6
    t = square(np.zeros((6, 7), np.int32), 1, 1, 4, 5, 1)
    p = square(square(np.zeros_like(t), 1, 1, 4, 3, 3), 1, 4, 4, 2, 8)
    assert pq(t, p, 0.6)[0] == 0.0
    assert instance_metrics(t, p, 0.6, match='>=')['tp'] == 1 and pq(t, p, 0.6, match='>=')[0] == pytest.approx(2 / 3)

def test_match_ge_pairs_tied_halves_once():
    t = np.ones((2, 4), np.int32)
    p = np.zeros_like(t); p[:, :2] = 1; p[:, 2:] = 2        # two halves, IoU 0.5 each
    m = instance_metrics(t, p, match='>=')
    assert (m['tp'], m['fp'], m['fn']) == (1, 1, 0) and m['dq'] == pytest.approx(2 / 3)
    assert m['sq'] == pytest.approx(0.5 / (1 + 1e-6), abs=1e-15)
    m = instance_metrics(p, t, match='>=')                  # merged: one prediction over two true halves
    assert (m['tp'], m['fp'], m['fn']) == (1, 0, 1)
    assert instance_metrics(t, p)['tp'] == 0                # '>': no match at all
    # per class: the same rule, one class at a time
    cnt = class_pq_counts(overlaps(t, p), [1], [1, 1], [1], match='>=')
    np.testing.assert_allclose(cnt, [[1, 1, 0, 0.5]])
    np.testing.assert_allclose(class_pq_counts(overlaps(t, p), [1], [1, 1], [1]), [[0, 2, 1, 0.0]])

def test_bad_match_raises():
    t = np.ones((2, 2), np.int32)
    for f in (lambda: pq(t, t, match='=>'), lambda: object_f1(t, t, match='ge'),
              lambda: instance_metrics(t, t, match='>>'), lambda: class_pq_counts(overlaps(t, t), [1], [1], [1], match='')):
        with pytest.raises(ValueError, match="match must be '>'"): f()

def test_empty_image_policy():
    z = np.zeros((5, 5), np.int32); t = square(np.zeros_like(z), 1, 1, 2, 2, 3)
    for empty, v in (('zero', 0.0), ('one', 1.0)):
        m = instance_metrics(z, z, empty=empty)
        assert [m[k] for k in M.INSTANCE_METRICS] == [v] * len(M.INSTANCE_METRICS)
        assert (m['n_true'], m['n_pred'], m['tp'], m['fp'], m['fn']) == (0, 0, 0, 0, 0)
        assert instance_metrics(t, z, empty=empty)['pq'] == 0.0 and instance_metrics(z, t, empty=empty)['dice1'] == 0.0
    assert all(np.isnan(instance_metrics(z, z, empty='skip')[k]) for k in M.INSTANCE_METRICS)
    with pytest.raises(ValueError, match='empty must be one of'): instance_metrics(z, z, empty='nan')
    # CoNIC's epsilon in DQ: one exact nucleus -> DQ = 1 / (1 + 1e-6)
    assert instance_metrics(t, t, eps_dq=1e-6)['dq'] == pytest.approx(1 / (1 + 1e-6), abs=1e-15)
    assert instance_metrics(t, t)['dq'] == 1.0

def test_conventions_presets():
    assert CONVENTIONS['hovernet'] == dict(match='>', empty='skip', eps_dq=0.0)
    assert CONVENTIONS['conic'] == dict(match='>', empty='zero', eps_dq=1e-6)
    assert CONVENTIONS['stardist']['match'] == '>='
    assert resolve_conventions()['label'] == 'hovernet'
    assert resolve_conventions('conic', empty='skip')['label'] == 'conic,empty=skip'
    assert resolve_conventions('conic', match='>')['label'] == 'conic'  # no change, no suffix
    with pytest.raises(ValueError, match="unknown metric conventions 'coniC'"): resolve_conventions('coniC')

def test_evaluate_conventions_change_the_mean():
    one = square(np.zeros((8, 8), np.int32), 2, 2, 3, 3, 1); none = np.zeros_like(one)
    half = square(square(np.zeros_like(one), 2, 2, 3, 2, 1), 2, 4, 3, 1, 2)  # 6 + 3 px pieces of the 9 px nucleus
    def mean(**kw):
        df = evaluate([one, none, one], [one, none, half], **kw)
        return df[df.kind == 'mean'].iloc[0], df
    sq1 = 1 / (1 + 1e-6)
    # image 3: IoU 6/9 -> TP 1 (IoU 2/3), FP 1: DQ 2/3, SQ (2/3)/(1+1e-6)
    pq3 = (2 / 3) * (2 / 3) / (1 + 1e-6)
    r, df = mean()
    assert r.pq == pytest.approx((sq1 + pq3) / 2, abs=1e-15) and set(df.conventions) == {'hovernet'}
    assert np.isnan(df.pq[1]) and r.n_images == 3
    r, df = mean(empty='zero')
    assert r.pq == pytest.approx((sq1 + pq3) / 3, abs=1e-15) and df.pq[1] == 0.0
    assert df.conventions[0] == 'hovernet,empty=zero'
    r, df = mean(conventions='conic')  # DQ + 1e-6 and the empty image as 0
    dq3 = 1 / (1.5 + 1e-6)
    assert r.pq == pytest.approx((sq1 * sq1 + dq3 * (2 / 3) / (1 + 1e-6)) / 3, abs=1e-15)
    assert list(df.columns)[-1] == 'conventions' and set(df.conventions) == {'conic'}
    r, df = mean(conventions='stardist')
    assert r.pq == pytest.approx((sq1 + pq3) / 3, abs=1e-15) and df.conventions[0] == 'stardist'
    with pytest.raises(ValueError, match='unknown metric conventions'): evaluate([one], [one], conventions='x')
    with pytest.raises(ValueError, match='empty must be one of'): evaluate([one], [one], empty='none')

def test_evaluate_match_reaches_per_class_pq():
    t = np.ones((2, 4), np.int32); p = np.zeros_like(t); p[:, :2] = 1; p[:, 2:] = 2   # halves, IoU 0.5
    df = evaluate([t, t], [p, p], types=([[1], [1]], [[1, 1], [1, 1]]), match='>=')
    img, pooled = df[df.kind == 'image'].iloc[0], df[df.kind == 'pooled'].iloc[0]
    assert (img.tp, img.fp, img.fn) == (1, 1, 0)
    # pooled over the two images: class 1 TP 2, FP 2, sum IoU 1
    assert pooled.pq_plus_1 == pytest.approx((2 / (3 + 1e-6)) * (1 / (2 + 1e-6)), abs=1e-15)
    assert evaluate([t, t], [p, p], types=([[1], [1]], [[1, 1], [1, 1]])).iloc[-1].pq_plus_1 == 0.0


# ---------------------------------------------------------------- CoNIC R² of per-class counts
def test_count_r2_by_hand():
    y = np.array([[2, 0], [4, 3], [6, 0]]); y_hat = np.array([[3, 0], [4, 0], [5, 3]])
    r2, r2_c = count_r2(y, y_hat)
    # class 1: 1 - (1 + 0 + 1) / (4 + 0 + 4); class 2: 1 - (0 + 9 + 9) / (1 + 4 + 1)
    np.testing.assert_allclose(r2_c, [0.75, -2.0], atol=1e-15)
    assert r2 == pytest.approx(-0.625, abs=1e-15)
    assert count_r2(y, y)[0] == 1.0
    np.testing.assert_array_equal(count_r2([[1, 0], [1, 0]], [[1, 0], [1, 1]])[1], [1.0, 0.0])  # constant truth
    r2, r2_c = count_r2([[4, 2]], [[4, 2]]); assert np.isnan(r2) and np.isnan(r2_c).all()     # one image
    with pytest.raises(ValueError, match=r'must both be \(n_images, n_types\)'): count_r2(y, y_hat[:, :1])
    with pytest.raises(ValueError, match=r'must both be'): count_r2(y[:, 0], y_hat[:, 0])

def test_count_r2_matches_sklearn_and_conic():
    from sklearn.metrics import r2_score
    rng = np.random.default_rng(4)
    y = rng.integers(0, 30, (9, 6)); y_hat = np.clip(y + rng.integers(-6, 7, y.shape), 0, None)
    y[:, 4] = 0; y_hat[:, 4] = 0; y[:, 5] = 3; y_hat[:3, 5] = 2  # an absent class predicted exactly; a constant one missed
    r2, r2_c = count_r2(y, y_hat)
    ref = [r2_score(y[:, c], y_hat[:, c]) for c in range(6)]
    np.testing.assert_allclose(r2_c, ref, atol=1e-12)
    assert r2_c[4] == 1.0 and r2_c[5] == 0.0 and r2 == pytest.approx(np.mean(ref), abs=1e-12)  # CoNIC: mean over classes
    names = ['neutrophil', 'epithelial', 'lymphocyte', 'plasma', 'eosinophil', 'connective']
    tdf = pd.DataFrame(y, columns=names); pdf = pd.DataFrame(y_hat, columns=names)[names[::-1]]  # columns by name
    np.testing.assert_allclose(count_r2(tdf, pdf)[1], ref, atol=1e-12)
    with pytest.raises(ValueError, match=r"no column \['plasma'\]"): count_r2(tdf, pdf.drop(columns='plasma'))

def test_class_counts():
    m = np.zeros((8, 8), np.int32); square(m, 0, 0, 2, 2, 5); square(m, 3, 3, 2, 2, 2); square(m, 5, 5, 3, 3, 9)
    ty = np.array([2, 1, 1])                                    # ids 2, 5, 9
    np.testing.assert_array_equal(class_counts([m], [1, 2], [ty]), [[2, 1]])
    np.testing.assert_array_equal(class_counts([m], [2, 1, 7], [ty]), [[1, 2, 0]])
    np.testing.assert_array_equal(class_counts([m], [1, 2], [ty], crop=(4, 4)), [[1, 1]])  # rows/cols 2..5
    np.testing.assert_array_equal(class_counts([m], [1, 2], [ty], crop=(2, 2)), [[0, 1]])  # rows/cols 3..4
    tmap = np.select([m == 5, m == 2, m == 9], [1, 2, 1])
    s = make_sample(np.zeros((8, 8, 3), np.uint8), m, inst_types=ty)
    c = class_counts([s, m], [1, 2], [None, tmap])
    np.testing.assert_array_equal(c, [[2, 1], [2, 1]])
    assert c.dtype == np.int64
    with pytest.raises(LabelError, match=r'image\[0\]: 2 types for 3 instances'): class_counts([m], [1], [ty[:2]])
    with pytest.raises(LabelError, match='no nucleus types'): class_counts([m], [1])
    with pytest.raises(ValueError, match='does not fit'): class_counts([m], [1], [ty], crop=(4, 9))
    with pytest.raises(ValueError, match='2 images but 1 type entries'): class_counts([m, m], [1], [ty])

def test_evaluate_pooled_r2_per_group():
    t1 = np.zeros((16, 16), np.int32); square(t1, 1, 1, 4, 4, 1); square(t1, 8, 8, 4, 4, 2)
    p1 = np.zeros_like(t1); square(p1, 1, 1, 4, 4, 1); square(p1, 8, 9, 4, 4, 2)
    t2 = np.zeros_like(t1); square(t2, 2, 2, 5, 5, 1); z = np.zeros_like(t1)
    trues = [_sample(t1, [1, 2], 'seen', 'a'), _sample(t2, [2], 'unseen', 'b'), _sample(z, [], 'seen', 'c')]
    preds = [_sample(p1, [1, 1], name='a'), _sample(z, []), _sample(z, [])]
    df = evaluate(trues, preds)
    pooled = df[df.kind == 'pooled'].set_index('group')
    # true counts (types 1, 2): a [1, 1], b [0, 1], c [0, 0]; predicted: a [2, 0], b and c [0, 0]
    # all: type 1 1 - 1 / (2/3) = -0.5, type 2 1 - 2 / (2/3) = -2; seen (a, c): -1 and -1; unseen: one image -> NaN
    assert (pooled.loc['all', 'r2_1'], pooled.loc['all', 'r2_2']) == (pytest.approx(-0.5), pytest.approx(-2.0))
    assert pooled.loc['all', 'r2'] == pytest.approx(-1.25) and pooled.loc['seen', 'r2'] == pytest.approx(-1.0)
    assert np.isnan(pooled.loc['unseen', 'r2'])
    n_t, n_p = class_counts(trues, [1, 2]), class_counts(preds, [1, 2])
    assert pooled.loc['all', 'r2'] == pytest.approx(count_r2(n_t, n_p)[0], abs=1e-15)


# ---------------------------------------------------------------- Gong et al.'s AJI, object-level Dice, AP over IoU thresholds
def ref_aji_gong(true, pred):
    "Eqs. 10-11 of Gong et al., one mask per instance: T_i in id order takes the unused P_j of largest exact IoU."
    _, _, inter, union, at, ap = ref_tables(true, pred)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    used = np.zeros(len(ap), bool); C = U = 0.0
    for i in range(len(at)):
        cand = np.where((inter[i] > 0) & ~used, iou[i], -1.0)
        j = int(np.argmax(cand)) if len(ap) else 0
        if len(ap) and cand[j] > 0: used[j] = True; C += inter[i, j]; U += union[i, j]
        else: U += at[i]                                        # no overlapping prediction left
    return C / (U + ap[~used].sum())

def ref_object_dice(true, pred):
    "GlaS object Dice, one mask per instance; the most overlapping partner, lowest id on ties."
    _, _, inter, _, at, ap = ref_tables(true, pred)
    def side(inter, a, b):  # sum over the objects of a of |a_i| / sum|a| * Dice(a_i, best b)
        out = 0.0
        for i in range(len(a)):
            j = int(np.argmax(inter[i])) if len(b) else 0
            if len(b) and inter[i, j] > 0: out += a[i] / a.sum() * 2 * inter[i, j] / (a[i] + b[j])
        return out
    return 0.5 * (side(inter, at, ap) + side(inter.T, ap, at))

def ref_stardist_tp(true, pred, thr, match='>='):
    "stardist.matching: Hungarian on -(IoU >= thr) - IoU / (2 n_matched) over the full matrix, then count the hits."
    _, _, inter, union, at, ap = ref_tables(true, pred)
    scores = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    n = min(len(at), len(ap))
    if n == 0: return 0
    hit = scores >= thr if match == '>=' else scores > thr
    r, c = linear_sum_assignment(-hit.astype(float) - scores / (2 * n))
    return int(hit[r, c].sum())

def hand_strip_ab():
    "A (20 px) and B (8 px) touching; P (20 px) over the right of A and all of B, Q (8 px) the left of A."
    t = np.zeros((2, 14), np.int32); t[:, 0:10] = 1; t[:, 10:14] = 2
    p = np.zeros_like(t); p[:, 4:14] = 5; p[:, 0:4] = 9
    return t, p

def hand_ap_maps():
    "T1 split 12 + 8 (IoU .6, .4); T2 inside P3 (IoU .5), touching T1; T3 exact; T4 missed."
    t = np.zeros((8, 10), np.int32); square(t, 0, 0, 4, 5, 1); square(t, 0, 5, 2, 2, 2); square(t, 5, 0, 3, 3, 3)
    square(t, 5, 6, 2, 2, 4)
    p = np.zeros_like(t); square(p, 0, 0, 4, 3, 1); square(p, 0, 3, 4, 2, 2); square(p, 0, 5, 2, 4, 3)
    square(p, 5, 0, 3, 3, 4)
    return t, p

def test_aji_gong_by_hand_differs_from_aji_and_aji_plus():
    t, p = hand_strip_ab()
    # IoU A:P = 12/28, A:Q = 8/20, B:P = 8/20. Gong: A takes P, B has nothing left, Q unused -> 12 / (28 + 8 + 8)
    assert aji_gong(t, p) == pytest.approx(3 / 11, abs=1e-15)
    assert aji(t, p) == pytest.approx(5 / 14, abs=1e-15)        # P reused: (12 + 8) / (28 + 20 + 8)
    assert aji_plus(t, p) == pytest.approx(2 / 5, abs=1e-15)    # Hungarian: A:Q + B:P -> 16 / 40
    # the order of the true ids matters (Eq. 10 visits i = 1, 2, ...): B first takes P, then A takes Q
    assert aji_gong(np.where(t == 1, 9, np.where(t == 2, 4, 0)), p) == pytest.approx(2 / 5, abs=1e-15)
    # prediction ids do not matter (no ties here)
    assert aji_gong(t, np.where(p == 5, 1, np.where(p == 9, 2, 0))) == aji_gong(t, p)
    # merge: two true nuclei (12 + 8 px) under one 20 px prediction
    m = np.zeros((4, 5), np.int32); m[:, :3] = 1; m[:, 3:] = 2
    assert aji_gong(m, np.ones_like(m)) == pytest.approx(12 / 28) and aji(m, np.ones_like(m)) == pytest.approx(0.5)

def test_aji_gong_zero_overlap_and_ties():
    # T1 overlaps nothing; the literal argmax of Eq. 10 would hand it P1 (IoU 0) and leave T2 unmatched
    t = np.zeros((2, 8), np.int32); t[:, 0:2] = 1; t[:, 4:8] = 2
    p = np.zeros_like(t); p[:, 4:8] = 1
    assert aji_gong(t, p) == pytest.approx(8 / (8 + 4))        # T2 exact, T1 adds its 4 px
    # a tie of exact IoU goes to the lowest prediction id: T (12 px) has P1 = 4 px inside (IoU 4/12) and P2 = 8 px,
    # 5 inside (IoU 5/15). P1 first: 4 / (12 + 8); P2 first: 5 / (15 + 4). HoVer-Net's IoU / (union + 1e-6) prefers
    # the larger union, P2, whatever the ids.
    t = np.zeros((1, 16), np.int32); t[0, 0:12] = 1
    p = np.zeros_like(t); p[0, 0:4] = 1; p[0, 7:15] = 2
    assert aji_gong(t, p) == pytest.approx(4 / 20, abs=1e-15) and aji(t, p) == pytest.approx(5 / 19, abs=1e-15)
    assert aji_gong(t, np.where(p > 0, 3 - p, 0)) == pytest.approx(5 / 19, abs=1e-15)   # ids swapped

def test_object_dice_by_hand():
    g = np.zeros((2, 20), np.int32); g[:, 0:6] = 1; g[:, 6:10] = 2; g[:, 14:16] = 3   # 12, 8 (touching), 4 px
    s = np.zeros_like(g); s[:, 0:10] = 4; s[:, 17:20] = 8                               # 20 px over G1 + G2, 6 px FP
    true_side = 12 / 24 * 24 / 32 + 8 / 24 * 16 / 28 + 0          # gamma_i Dice(G_i, S*(G_i)) = 95/168
    pred_side = 20 / 26 * 24 / 32 + 0                             # sigma_j Dice(G*(S_j), S_j) = 15/26
    assert (true_side, pred_side) == (pytest.approx(95 / 168), pytest.approx(15 / 26))
    assert object_dice(g, s) == pytest.approx(2495 / 4368, abs=1e-15) == pytest.approx((true_side + pred_side) / 2)
    assert object_dice(s, g) == pytest.approx(2495 / 4368, abs=1e-15)
    # the partner is the one sharing the most pixels, not the best Dice: G (10 px) shares 4 px with S1 (4 px, Dice 4/7)
    # and 6 px with S2 (30 px, Dice 12/40); G takes S2
    g = np.zeros((1, 40), np.int32); g[0, 0:10] = 1
    s = np.zeros_like(g); s[0, 0:4] = 1; s[0, 4:34] = 2
    assert object_dice(g, s) == pytest.approx(0.5 * (12 / 40 + (4 / 34 * 8 / 14 + 30 / 34 * 12 / 40)), abs=1e-15)
    assert object_dice(g, s) == pytest.approx(188 / 595, abs=1e-15)

def test_average_precision_by_hand():
    t, p = hand_ap_maps()
    r = average_precision(t, p)
    assert list(r['ap']) == list(AP_THRESHOLDS) and AP_THRESHOLDS[4] == 0.7          # decimal thresholds
    assert [r['tp'][x] for x in AP_THRESHOLDS] == [3, 2, 2] + [1] * 7
    assert [r['fp'][x] for x in (0.5, 0.6, 0.95)] == [1, 2, 3] and [r['fn'][x] for x in (0.5, 0.6, 0.95)] == [1, 2, 3]
    np.testing.assert_allclose([r['ap'][x] for x in AP_THRESHOLDS], [3 / 5, 1 / 3, 1 / 3] + [1 / 7] * 7, atol=1e-15)
    assert r['mean'] == pytest.approx(17 / 75, abs=1e-15)
    assert (r['precision'][0.5], r['recall'][0.5], r['precision'][0.55], r['recall'][0.95]) == (0.75, 0.75, 0.5, 0.25)
    # '>' (the DSB page's "greater than"): IoU exactly 0.5 and 0.6 no longer count
    g = average_precision(t, p, match='>')
    assert [g['tp'][x] for x in AP_THRESHOLDS] == [2, 2] + [1] * 8 and g['mean'] == pytest.approx(19 / 105, abs=1e-15)
    # halves at IoU exactly 1/2 each: one TP, whether the prediction merges two nuclei or splits one
    h = np.zeros((2, 4), np.int32); h[:, :2] = 1; h[:, 2:] = 2
    for a, b, counts in ((h, np.ones_like(h), (1, 0, 1)), (np.ones_like(h), h, (1, 1, 0))):
        r = average_precision(a, b, thresholds=[0.5])
        assert (r['tp'][0.5], r['fp'][0.5], r['fn'][0.5]) == counts and r['ap'][0.5] == 0.5
        assert average_precision(a, b, thresholds=[0.5], match='>')['tp'][0.5] == 0
    # an IoU of exactly 7/10 at tau = 0.7 (np.arange would give 0.7000000000000002 and miss it)
    t7 = np.zeros((2, 5), np.int32); t7[:, :5] = 1; p7 = np.zeros_like(t7); p7[:, :3] = 1; p7[0, 3] = 1   # 7 of 10 px
    assert average_precision(t7, p7, thresholds=[0.7])['tp'] == {0.7: 1}
    assert average_precision(t7, p7, thresholds=np.arange(0.5, 1, 0.05)[4:5])['tp'][0.7000000000000002] == 0

def test_average_precision_below_half_maximises_matches_as_stardist():
    # T0 (10 px) overlaps P0 (IoU 2/3) and P1 (IoU 1/6); T1 (3 px) overlaps P0 (IoU 2/11).
    # stardist at tau 0.15: two matches (T0:P1, T1:P0); PQ's Hungarian on IoU keeps T0:P0 (2/3 > 1/6 + 2/11)
    t = np.zeros((1, 16), np.int32); t[0, 2:12] = 1; t[0, 12:15] = 2
    p = np.zeros_like(t); p[0, 0:4] = 1; p[0, 4:14] = 2
    r = average_precision(t, p, thresholds=[0.15])
    assert (r['tp'][0.15], r['fp'][0.15], r['fn'][0.15], r['ap'][0.15]) == (2, 0, 0, 1.0)
    assert ref_stardist_tp(t, p, 0.15) == 2
    assert instance_metrics(t, p, 0.15)['tp'] == 1            # PQ's pairing below 0.5 differs, as documented

def test_paper_metrics_empty_maps():
    t = square(np.zeros((8, 8), np.int32), 2, 2, 3, 3, 5); z = np.zeros_like(t)
    assert np.isnan(aji_gong(z, z)) and np.isnan(object_dice(z, z))
    for a, b in [(t, z), (z, t)]:
        assert aji_gong(a, b) == 0.0 and object_dice(a, b) == 0.0
        r = average_precision(a, b)
        assert r['mean'] == 0.0 and set(r['precision'].values()) == {0.0} and set(r['recall'].values()) == {0.0}
    assert average_precision(t, z)['fn'][0.5] == 1 and average_precision(z, t)['fp'][0.5] == 1
    # no true and no predicted nuclei: stardist gives 0 (empty='zero', the default); NaN or 1 on request
    r = average_precision(z, z)
    assert r['mean'] == 0.0 and r['tp'][0.5] == r['fp'][0.5] == r['fn'][0.5] == 0
    assert np.isnan(average_precision(z, z, empty='skip')['ap'][0.75]) and average_precision(z, z, empty='one')['mean'] == 1
    # nothing overlaps: 0, no division by zero
    p = square(np.zeros_like(t), 6, 6, 2, 2, 1)
    assert aji_gong(t, p) == 0.0 and object_dice(t, p) == 0.0 and average_precision(t, p)['mean'] == 0.0

def test_paper_metrics_bad_input():
    t = np.zeros((4, 4), np.int32)
    for f in (aji_gong, object_dice, average_precision):
        with pytest.raises(LabelError, match=r'true map has shape \(4, 4\) but pred map has shape \(4, 5\)'):
            f(t, np.zeros((4, 5), np.int32))
        with pytest.raises(LabelError, match='pred: label map has negative ids'): f(t, t - 1)
        with pytest.raises(LabelError, match='integer'): f(t.astype(float), t)
    for th in ([], [0.0, 0.5], [1.5], 0):
        with pytest.raises(ValueError, match=r'AP thresholds must be a non-empty sequence of IoUs in \(0, 1\]'):
            average_precision(t, t, thresholds=th)
    with pytest.raises(ValueError, match="match must be '>'"): average_precision(t, t, match='=>')
    with pytest.raises(ValueError, match='empty must be one of'): average_precision(t, t, empty='nan')

@pytest.mark.parametrize('seed', range(8))
def test_paper_metrics_match_reference_on_random_fields(seed):
    rng = np.random.default_rng(100 + seed)
    t = blob_field(rng); p = perturb(rng, t) if seed % 4 else blob_field(rng)
    assert aji_gong(t, p) == pytest.approx(ref_aji_gong(t, p), abs=1e-12)
    assert object_dice(t, p) == pytest.approx(ref_object_dice(t, p), abs=1e-12)
    r = average_precision(t, p, thresholds=AP_THRESHOLDS + (0.1, 0.3))
    for tau in r['tp']: assert r['tp'][tau] == ref_stardist_tp(t, p, tau), tau
    tps = [r['tp'][x] for x in AP_THRESHOLDS]
    assert tps == sorted(tps, reverse=True)                    # fewer matches at stricter thresholds
    n_t, n_p = len(np.unique(t)) - 1, len(np.unique(p)) - 1
    for tau in r['ap']:
        assert r['tp'][tau] + r['fp'][tau] == n_p and r['tp'][tau] + r['fn'][tau] == n_t
        assert r['ap'][tau] == pytest.approx(r['tp'][tau] / (n_t + n_p - r['tp'][tau]) if r['tp'][tau] else 0.0)
    assert r['mean'] == pytest.approx(np.mean([r['ap'][x] for x in r['ap']]))

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(np.int64, (5, 6), elements=st.integers(0, 5)), arrays(np.int64, (5, 6), elements=st.integers(0, 5)))
def test_paper_metrics_match_reference_on_noise_with_ties(t, p):
    # tiny noisy maps: exact IoU and overlap ties everywhere, halves at IoU 1/2, merges, empty maps
    if not t.any() and not p.any():
        assert np.isnan(aji_gong(t, p)) and np.isnan(object_dice(t, p)); return
    assert aji_gong(t, p) == pytest.approx(ref_aji_gong(t, p), abs=1e-12)
    assert object_dice(t, p) == pytest.approx(ref_object_dice(t, p), abs=1e-12)
    r = average_precision(t, p, thresholds=(0.2, 0.5, 0.6))
    for tau in (0.2, 0.5, 0.6): assert r['tp'][tau] == ref_stardist_tp(t, p, tau), tau
    assert average_precision(t, p, thresholds=[0.5], match='>')['tp'][0.5] == ref_stardist_tp(t, p, 0.5, '>')

def _monotone_relabel(rng, m):
    "The same instances under new, larger ids in the same order."
    ids = np.unique(m); ids = ids[ids > 0]
    new = np.cumsum(rng.integers(1, 2**34, len(ids)))  # increasing, with gaps, some above 2**32
    lut = dict(zip(ids.tolist(), new.tolist())); lut[0] = 0
    return np.vectorize(lut.get, otypes=[np.int64])(m)

def _shuffled(rng, m):
    ids = np.unique(m); ids = ids[ids > 0]
    lut = dict(zip(ids.tolist(), rng.permutation(ids + 500).tolist())); lut[0] = 0
    return np.vectorize(lut.get, otypes=[np.int64])(m)

def _has_ties(t, p):
    "Whether some instance has two partners of equal IoU or equal overlap (where tie-breaking by id matters)."
    _, _, inter, union, _, _ = ref_tables(t, p)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    for a in (iou, iou.T, inter, inter.T):
        for row in a:
            v = row[row > 0]
            if len(v) and (v == v.max()).sum() > 1: return True
    return False

def test_paper_metrics_invariants_on_random_maps():
    rng = np.random.default_rng(21)
    checked = same = 0
    for k in range(10):
        t = blob_field(rng, n=14); p = perturb(rng, t)
        # identical maps score 1
        assert aji_gong(t, t) == 1.0 and object_dice(t, t) == 1.0 and average_precision(t, t)['mean'] == 1.0
        g, d, a = aji_gong(t, p), object_dice(t, p), average_precision(t, p)
        assert 0 <= g <= 1 and 0 <= d <= 1 and 0 <= a['mean'] <= 1
        # other ids in the same order: exactly the same numbers
        t2, p2 = _monotone_relabel(rng, t), _monotone_relabel(rng, p)
        assert (aji_gong(t2, p2), object_dice(t2, p2), average_precision(t2, p2)) == (g, d, a)
        # shuffled ids: AP never changes; Dice_obj and (prediction ids only) Gong's AJI unless a tie is broken by id
        ts, ps = _shuffled(rng, t), _shuffled(rng, p)
        assert average_precision(ts, ps)['tp'] == a['tp']
        assert object_dice(p, t) == pytest.approx(d, abs=1e-12)          # symmetric
        if not _has_ties(t, p):
            checked += 1
            assert object_dice(ts, ps) == pytest.approx(d, abs=1e-12) and aji_gong(t, ps) == pytest.approx(g, abs=1e-12)
        # Gong's AJI equals HoVer-Net's whenever no prediction is the best of two nuclei (nothing would be reused)
        _, _, inter, union, _, _ = ref_tables(t, p)
        best = [int(np.argmax(r / (u + 1e-6))) for r, u in zip(inter, union) if r.max() > 0]
        if len(set(best)) == len(best):
            same += 1; assert g == pytest.approx(aji(t, p), abs=1e-12)
    assert checked >= 3 and same >= 2, (checked, same)  # both invariants were exercised

def test_gong_obj_f1_and_pixel_f1_are_object_f1_and_pixel_f1():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(8)
    for _ in range(4):
        t = blob_field(rng); p = perturb(rng, t)
        # Pixel-F1: the F1 score of the foreground pixels
        assert pixel_f1(t, p) == pytest.approx(f1_score((t > 0).ravel(), (p > 0).ravel()), abs=1e-12)
        # Obj-F1 (Eq. 9): 2TP / (FN + 2TP + FP), TP = pairs with IoU above 0.5 (unique), counted by brute force
        _, _, inter, union, at, ap = ref_tables(t, p)
        tp = int((inter / np.maximum(union, 1) > 0.5).sum())
        assert object_f1(t, p) == pytest.approx(2 * tp / ((len(at) - tp) + 2 * tp + (len(ap) - tp)), abs=1e-15)

def test_instance_metrics_and_evaluate_extra_columns():
    t, p = hand_ap_maps(); a, b = hand_strip_ab(); z = np.zeros((3, 3), np.int32)
    base = instance_metrics(t, p)
    m = instance_metrics(t, p, extra=['object_dice', 'ap', 'aji_gong'])
    assert list(m) == list(base) + ['aji_gong', 'object_dice'] + AP_KEYS and {k: m[k] for k in base} == base
    assert AP_KEYS[:2] == ['ap50', 'ap55'] and AP_KEYS[-2:] == ['ap95', 'ap50_95'] and EXTRA_METRICS == ('aji_gong', 'object_dice', 'ap')
    assert m['aji_gong'] == aji_gong(t, p) and m['object_dice'] == object_dice(t, p)
    # AP follows the table's match: '>' by default (HoVer-Net), '>=' under stardist's conventions
    assert m['ap50_95'] == pytest.approx(19 / 105, abs=1e-15)
    assert instance_metrics(t, p, match='>=', extra=['ap'])['ap50_95'] == pytest.approx(17 / 75, abs=1e-15)
    for empty, v in (('skip', np.nan), ('zero', 0.0), ('one', 1.0)):
        e = instance_metrics(z, z, empty=empty, extra=EXTRA_METRICS)
        np.testing.assert_array_equal([e[k] for k in ['aji_gong', 'object_dice'] + AP_KEYS], v)
    with pytest.raises(ValueError, match=r"unknown extra metrics \['pq_gong'\]"): instance_metrics(t, p, extra=['pq_gong'])
    df = evaluate([t, a, z], [p, b, z], conventions='stardist', extra=['ap', 'aji_gong', 'object_dice'])
    plain = evaluate([t, a, z], [p, b, z], conventions='stardist')
    pd.testing.assert_frame_equal(df[plain.columns], plain)
    assert list(df.columns)[-1] == 'conventions'
    assert df.ap50_95[0] == pytest.approx(17 / 75, abs=1e-15) and df.aji_gong[1] == pytest.approx(3 / 11, abs=1e-15)
    assert df.ap50[2] == 0.0 and df.aji_gong[2] == 0.0 and df.object_dice[2] == 0.0   # stardist: empty='zero'
    mean = df[df.kind == 'mean'].iloc[0]
    assert mean.ap50_95 == pytest.approx((17 / 75 + 0.0 + 0.0) / 3, abs=1e-15)        # DSB: the mean over images
    hv = evaluate([t, z], [p, z], extra=['ap'])                                          # HoVer-Net: the empty image is skipped
    assert np.isnan(hv.ap50[1]) and hv[hv.kind == 'mean'].ap50_95.item() == pytest.approx(19 / 105, abs=1e-15)
    with pytest.raises(ValueError, match='unknown extra metrics'): evaluate([t], [p], extra=['map'])
