"""Metrics: hand-built cases with known answers, and random detections against oracles
(pycocotools run on independently written COCO files; a loop-based VOC AP written here)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from support.evalm import facemask_dir, pred, random_detections, record, synthetic_records
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distdet.classes import CLASS_NAMES
from distdet.eval import compute_metrics, format_metrics_table, scalar_metrics
from distdet.eval.coco import records_to_coco

C1, C2, C3 = CLASS_NAMES
A = [0, 0, 10, 10]
B = [20, 20, 30, 30]
C = [40, 40, 52, 50]


def metrics_of(records, preds, **kw):
    return compute_metrics(records, preds, CLASS_NAMES, **kw)


# ----------------------------------------------------------------------------- hand-built cases


def test_perfect_detections_score_one_everywhere():
    records = [record("a", [A, B], [1, 2]), record("b", [C], [3]), record("c", [A, C], [1, 1])]
    preds = [pred(r.boxes, [0.9] * r.num_objects, r.labels) for r in records]
    m = metrics_of(records, preds)
    for name in CLASS_NAMES:
        assert m[f"voc/AP50/{name}"] == 1.0
        assert m[f"coco/AP/{name}"] == pytest.approx(1.0)
        assert m[f"thresholded/precision/{name}"] == 1.0
        assert m[f"thresholded/recall/{name}"] == 1.0
        assert m[f"thresholded/f1/{name}"] == 1.0
    assert m["voc/mAP50"] == 1.0
    assert m["coco/AP"] == pytest.approx(1.0) and m["coco/AP50"] == pytest.approx(1.0)
    assert m["coco/AR100"] == pytest.approx(1.0)
    assert m["confusion_matrix"]["counts"] == [[3, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["counts"]["ground_truth"] == {C1: 3, C2: 1, C3: 1}


def test_every_detection_has_the_wrong_class():
    records = [record("a", [A, B], [1, 2]), record("b", [C], [3])]
    shifted = {1: 2, 2: 3, 3: 1}
    preds = [pred(r.boxes, [0.9] * r.num_objects, [shifted[int(l)] for l in r.labels]) for r in records]
    m = metrics_of(records, preds)
    for name in CLASS_NAMES:
        assert m[f"voc/AP50/{name}"] == 0.0
        assert m[f"coco/AP/{name}"] == 0.0
        assert m[f"thresholded/precision/{name}"] == 0.0
        assert m[f"thresholded/f1/{name}"] == 0.0
    assert m["voc/mAP50"] == 0.0 and m["coco/AP"] == 0.0
    # The confusion matrix shows what each class was mistaken for.
    assert m["confusion_matrix"]["counts"] == [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_duplicate_is_a_false_positive_all_point_and_eleven_point():
    # Two objects; ranked detections: hit A, duplicate of A, hit B.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    records = [record("a", [A, B], [1, 1])]
    preds = [pred([A, A, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    m = metrics_of(records, preds, voc07=True)
    assert m[f"voc/AP50/{C1}"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)
    assert m[f"voc07/AP50/{C1}"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-12)
    # COCO's 101 recall points: 0..0.50 at precision 1, 0.51..1.00 at 2/3 (boxes are exact,
    # so every IoU threshold agrees).
    coco_expected = (51 * 1 + 50 * 2 / 3) / 101
    assert m["coco/AP50"] == pytest.approx(coco_expected, abs=1e-12)
    assert m["coco/AP"] == pytest.approx(coco_expected, abs=1e-12)
    # Classes without ground truth are undefined and left out of the means.
    assert m[f"voc/AP50/{C2}"] is None and m[f"coco/AP/{C2}"] is None
    assert m["voc/mAP50"] == m[f"voc/AP50/{C1}"]
    assert m["voc07/mAP50"] == m[f"voc07/AP50/{C1}"]


def test_empty_images_and_false_positive_on_image_without_objects():
    records = [record("a", [A], [1]), record("empty1", [], []), record("empty2", [], [])]
    preds = [pred([A], [0.9], [1]), pred(), pred([B], [0.95], [1])]
    m = metrics_of(records, preds)
    # Ranked: false positive (0.95), then the hit: precision 0, 1/2 at recall 0, 1.
    assert m[f"voc/AP50/{C1}"] == pytest.approx(0.5, abs=1e-12)
    assert m["confusion_matrix"]["counts"][3] == [1, 0, 0, 0]
    assert m[f"thresholded/precision/{C1}"] == 0.5 and m[f"thresholded/recall/{C1}"] == 1.0


def test_no_detections_at_all_gives_zeros_not_errors():
    records = [record("a", [A, B], [1, 2]), record("b", [], [])]
    m = metrics_of(records, [pred(), pred()])
    assert m["coco/AP"] == 0.0 and m["coco/AP50"] == 0.0 and m["coco/AR100"] == 0.0
    assert m[f"coco/AP/{C1}"] == 0.0 and m[f"coco/AP/{C3}"] is None
    assert m["voc/mAP50"] == 0.0 and m[f"voc/AP50/{C2}"] == 0.0
    assert m[f"thresholded/precision/{C1}"] is None and m[f"thresholded/recall/{C1}"] == 0.0
    assert m["confusion_matrix"]["counts"][0] == [0, 0, 0, 1]


def test_score_ties_follow_image_order_and_are_deterministic():
    hit_image = record("hit", [A], [1])
    miss_image = record("miss", [], [])
    hit, miss = pred([A], [0.5], [1]), pred([B], [0.5], [1])
    first_miss = metrics_of([miss_image, hit_image], [miss, hit])
    first_hit = metrics_of([hit_image, miss_image], [hit, miss])
    assert first_miss[f"voc/AP50/{C1}"] == pytest.approx(0.5, abs=1e-12)
    assert first_hit[f"voc/AP50/{C1}"] == 1.0
    again = metrics_of([miss_image, hit_image], [miss, hit])
    assert json.dumps(again, sort_keys=True) == json.dumps(first_miss, sort_keys=True)


def test_difficult_objects_are_ignored_by_voc():
    records = [record("a", [A, B], [1, 1], difficult=[False, True]), record("b", [C], [2], difficult=[True])]
    # A detection on the difficult box B ranks first; it must be neither TP nor FP, and B
    # must not count as a missed positive.
    preds = [pred([B, A], [0.95, 0.9], [1, 1]), pred([C], [0.9], [2])]
    m = metrics_of(records, preds)
    assert m[f"voc/AP50/{C1}"] == 1.0
    assert m[f"voc/AP50/{C2}"] is None  # only difficult ground truth
    assert m["voc/mAP50"] == 1.0
    assert m["counts"]["ground_truth"][C1] == 1 and m["counts"]["difficult"][C1] == 1
    assert m["confusion_matrix"]["counts"] == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # COCO has no "difficult": there the box B is an ordinary object, matched by its detection.
    assert m[f"coco/AP/{C1}"] == pytest.approx(1.0)


def test_iou_threshold_is_strict_and_uses_continuous_coordinates():
    # Detection [0,0,10,20] on object [0,0,10,10]: IoU exactly 100/200 = 0.5 -> not a hit (devkit >).
    # With the "+1" convention it would be 121/231 > 0.5 and count.
    records = [record("a", [A], [1])]
    m = metrics_of(records, [pred([[0, 0, 10, 20]], [0.9], [1])])
    assert m[f"voc/AP50/{C1}"] == 0.0
    assert "continuous" in m["protocol"]["iou"]
    m = metrics_of(records, [pred([[0, 0, 10, 19.9]], [0.9], [1])])
    assert m[f"voc/AP50/{C1}"] == 1.0


def test_confusion_matrix_and_per_class_rates_on_a_hand_case():
    d = [60, 60, 70, 70]
    records = [record("a", [A, B, C, d], [1, 2, 3, 1], difficult=[False, False, False, True])]
    preds = [pred(
        [A, B, A, [80, 80, 90, 90], d, C],
        [0.9, 0.8, 0.6, 0.7, 0.65, 0.3],
        [1, 1, 1, 2, 3, 3],
    )]
    m = metrics_of(records, preds, score_threshold=0.5)
    # A found as with_mask; B (without_mask) predicted as with_mask; C's detection is below
    # the threshold so C is missed; a with_mask duplicate on A and a without_mask box on
    # nothing are background; the detection on the difficult box d is dropped.
    assert m["confusion_matrix"]["rows"] == [C1, C2, C3, "background"]
    assert m["confusion_matrix"]["columns"] == [C1, C2, C3, "missed"]
    assert m["confusion_matrix"]["counts"] == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]]
    assert m[f"thresholded/precision/{C1}"] == pytest.approx(1 / 3)
    assert m[f"thresholded/recall/{C1}"] == 1.0
    assert m[f"thresholded/f1/{C1}"] == pytest.approx(0.5)
    assert m[f"thresholded/precision/{C2}"] == 0.0 and m[f"thresholded/recall/{C2}"] == 0.0
    assert m[f"thresholded/f1/{C2}"] == 0.0
    assert m[f"thresholded/precision/{C3}"] is None and m[f"thresholded/recall/{C3}"] == 0.0
    assert m[f"thresholded/f1/{C3}"] is None


def test_bad_predictions_are_rejected_with_the_image_named():
    records = [record("a", [A], [1])]
    with pytest.raises(ValueError, match="1 predictions for 2 images"):
        compute_metrics(records * 2, [pred()], CLASS_NAMES)
    with pytest.raises(ValueError, match=r"prediction 0 \(image 'a'\).*1\.\.3"):
        compute_metrics(records, [pred([A], [0.5], [0])], CLASS_NAMES)
    with pytest.raises(ValueError, match="boxes must be"):
        compute_metrics(records, [{"boxes": np.zeros((1, 3)), "scores": [1.0], "labels": [1]}], CLASS_NAMES)
    with pytest.raises(ValueError, match="missing scores"):
        compute_metrics(records, [{"boxes": np.zeros((0, 4)), "labels": []}], CLASS_NAMES)
    with pytest.raises(ValueError, match="finite"):
        compute_metrics(records, [pred([A], [float("nan")], [1])], CLASS_NAMES)


def test_table_and_scalars():
    records = [record("a", [A, B], [1, 1])]
    m = metrics_of(records, [pred([A, A, B], [0.9, 0.8, 0.7], [1, 1, 1])], voc07=True)
    text = format_metrics_table(m)
    for name in (*CLASS_NAMES, "mean", "VOC AP50", "VOC07 AP50", "COCO AP", "missed", "background",
                 "continuous coordinates"):
        assert name in text
    scalars = scalar_metrics(m)
    assert scalars["voc/mAP50"] == m["voc/mAP50"]
    assert f"voc/AP50/{C2}" not in scalars  # undefined values are left out
    assert all(isinstance(v, float) for v in scalars.values())
    json.dumps(m, allow_nan=False)  # the whole dict is plain JSON


# ----------------------------------------------------------------------------- oracles


def evaluation_records(source: str):
    """The real tutorial test split (170 images), or random records that include empty
    images and difficult objects (the real data has neither)."""
    if source == "synthetic":
        return synthetic_records(150, seed=3)
    root = facemask_dir()
    if root is None:
        pytest.skip("real Face Mask data not present")
    from distdet.data import build_index, make_split, select_records

    records = build_index(root).records
    return select_records(records, make_split(records, "tutorial").test)


def oracle_coco(records, preds, tmp_path, cat_ids=None):
    """pycocotools on COCO files written here, independently of distdet.eval.coco."""
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]}
    for i, r in enumerate(records):
        gt["images"].append({"id": i, "width": r.width, "height": r.height})
        for b, l in zip(r.boxes.tolist(), r.labels.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": l,
                                      "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    results = []
    for i, p in enumerate(preds):
        for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": i, "category_id": l, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [None if v == -1 else float(v) for v in ev.stats]


def oracle_voc_ap(records, preds, label, eleven_point):
    """Straightforward VOC AP of one class, one detection at a time."""
    gts = {}
    npos = 0
    for i, r in enumerate(records):
        flags = r.difficult if len(r.difficult) == r.num_objects else [False] * r.num_objects
        gts[i] = [(b, bool(d)) for b, l, d in zip(r.boxes.tolist(), r.labels.tolist(), flags) if l == label]
        npos += sum(1 for _, d in gts[i] if not d)
    dets = [(s, i, b) for i, p in enumerate(preds)
            for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()) if l == label]
    dets.sort(key=lambda d: -d[0])  # stable: image order, then order within the image
    taken = {i: [False] * len(g) for i, g in gts.items()}
    outcomes = []  # True = TP, False = FP
    for _, i, b in dets:
        best, best_j = -math.inf, -1
        for j, (g, _) in enumerate(gts[i]):
            iw = min(b[2], g[2]) - max(b[0], g[0])
            ih = min(b[3], g[3]) - max(b[1], g[1])
            inter = iw * ih if iw > 0 and ih > 0 else 0.0
            union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
            iou = inter / union
            if iou > best:
                best, best_j = iou, j
        if best > 0.5:
            if gts[i][best_j][1]:
                continue
            outcomes.append(not taken[i][best_j])
            taken[i][best_j] = True
        else:
            outcomes.append(False)
    if npos == 0:
        return None
    precision, recall, tp = [], [], 0
    for k, hit in enumerate(outcomes, start=1):
        tp += hit
        precision.append(tp / k)
        recall.append(tp / npos)
    if eleven_point:
        return sum(max([p for p, r in zip(precision, recall) if r >= t / 10], default=0.0) for t in range(11)) / 11
    # Each true positive adds 1/npos of recall at the best precision reachable from its rank on.
    return sum(max(precision[k:]) / npos for k, hit in enumerate(outcomes) if hit)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_random_detections_match_pycocotools_and_loop_voc(source, seed, tmp_path):
    records = evaluation_records(source)
    preds = random_detections(records, seed)
    assert sum(len(p["scores"]) for p in preds) > 1000
    m = metrics_of(records, preds, voc07=True)

    stats = oracle_coco(records, preds, tmp_path)
    names = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100",
             "AR_small", "AR_medium", "AR_large"]
    for name, expected in zip(names, stats):
        assert m[f"coco/{name}"] == (None if expected is None else pytest.approx(expected, abs=1e-6)), name
    assert 0.05 < m["coco/AP"] < 0.9
    for k, name in enumerate(CLASS_NAMES):
        per_class = oracle_coco(records, preds, tmp_path, cat_ids=[k + 1])
        assert m[f"coco/AP/{name}"] == pytest.approx(per_class[0], abs=1e-6)
        assert m[f"coco/AP50/{name}"] == pytest.approx(per_class[1], abs=1e-6)

    for k, name in enumerate(CLASS_NAMES):
        for family, eleven in (("voc", False), ("voc07", True)):
            expected = oracle_voc_ap(records, preds, k + 1, eleven)
            assert m[f"{family}/AP50/{name}"] == pytest.approx(expected, abs=1e-6), (family, name)
    assert 0.05 < m["voc/mAP50"] < 0.95


def test_ground_truth_conversion_keeps_every_object_with_continuous_boxes():
    records = [record("a", [[1.5, 2, 11.5, 7]], [2], difficult=[True]), record("b", [], [])]
    coco = records_to_coco(records, CLASS_NAMES)
    assert [img["id"] for img in coco["images"]] == [0, 1]
    (ann,) = coco["annotations"]
    assert ann["id"] == 1 and ann["image_id"] == 0 and ann["category_id"] == 2
    assert ann["bbox"] == [1.5, 2.0, 10.0, 5.0] and ann["area"] == 50.0
    assert ann["iscrowd"] == 0 and ann["difficult"] == 1
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
