"""Tests for mdkd_det.data.datasets.splits (patient-level splits, LungCT series overlap)."""

import random

import pytest

from mdkd_det.data.datasets.coco import load_coco_json
from mdkd_det.data.datasets.lung_pet_ct_dx import load_lung_pet_ct_dx
from mdkd_det.data.datasets.splits import (
    drop_shared_series,
    group_key,
    lungct_series_id,
    lungct_series_overlap,
    series_overlap_report,
    split_by_patient,
    split_counts,
    split_labeled,
)
from mdkd_det.utils.errors import DatasetError


def _recs(n_patients, per_patient=3):
    return [
        {"image_id": f"p{p}_{i}", "patient_id": f"P{p:03d}", "file_name": f"p{p}_{i}.png"}
        for p in range(n_patients) for i in range(per_patient)
    ]


def _patients(recs):
    return {r["patient_id"] for r in recs}


def test_split_counts_hand_cases():
    assert split_counts(100, (0.72, 0.08, 0.20)) == [72, 8, 20]
    assert split_counts(12, (0.72, 0.08, 0.20)) == [9, 1, 2]  # 8.64, 0.96, 2.4
    assert split_counts(2, (0.72, 0.08, 0.20)) == [1, 0, 1]  # train and test get one each
    assert split_counts(1, (0.72, 0.08, 0.20)) == [1, 0, 0]
    assert split_counts(0, (0.72, 0.08, 0.20)) == [0, 0, 0]
    assert split_counts(10, (1.0, 0.0, 0.0)) == [10, 0, 0]


@pytest.mark.parametrize("fr", [(0.5, 0.5), (0.5, 0.4, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions(fr):
    with pytest.raises(DatasetError, match="fractions"):
        split_counts(10, fr)


def test_split_disjoint_complete_deterministic():
    recs = _recs(100)
    s = split_by_patient(recs, seed=0)
    sets = [_patients(s[k]) for k in ("train", "val", "test")]
    assert [len(x) for x in sets] == [72, 8, 20]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(v) for v in s.values()) == len(recs)
    # same seed -> same split, independent of record order; other seed -> different split
    shuffled = list(recs)
    random.Random(5).shuffle(shuffled)
    s2 = split_by_patient(shuffled, seed=0)
    assert _patients(s2["test"]) == sets[2] and _patients(s2["val"]) == sets[1]
    assert _patients(split_by_patient(recs, seed=1)["test"]) != sets[2]
    # records keep their input order inside a split
    assert s["train"] == [r for r in recs if r["patient_id"] in sets[0]]


def test_group_key_fallbacks():
    assert group_key({"patient_id": "A", "series_id": "S"}) == ("patient", "A")
    assert group_key({"patient_id": "", "series_id": "S", "image_id": 3}) == ("series", "S")
    assert group_key({"image_id": 3}) == ("image", "3")
    recs = [{"image_id": i, "series_id": f"s{i // 3}"} for i in range(30)]  # 10 series x 3
    s = split_by_patient(recs, seed=0)
    for k in s:
        for other in s:
            if other != k:
                assert not ({r["series_id"] for r in s[k]} & {r["series_id"] for r in s[other]})
    imgs = [{"image_id": i} for i in range(50)]
    assert [len(v) for v in split_by_patient(imgs).values()] == [36, 4, 10]


def test_lung_pet_ct_dx_patient_split(data_root):
    root = data_root / "lung_pet_ct_dx_sample"
    recs = load_lung_pet_ct_dx(str(root))
    s = split_by_patient(recs, seed=0)
    assert len(s["train"]) + len(s["val"]) + len(s["test"]) == 38
    assert len(_patients(s["train"])) == 1 and len(_patients(s["test"])) == 1 and s["val"] == []
    assert not (_patients(s["train"]) & _patients(s["test"]))


def test_lungct_series_overlap(data_root):
    d = data_root / "lungct_roboflow"
    tr = load_coco_json(str(d / "train" / "_annotations.coco.json"), str(d / "train"))
    va = load_coco_json(str(d / "valid" / "_annotations.coco.json"), str(d / "valid"))
    sid = lungct_series_id(va[0]["file_name"])
    assert sid.startswith("1-3-6-1-4-1-14519-5-2-1-6279-6001-") and "_" not in sid
    shared = lungct_series_overlap(tr, va)
    assert len(shared) == 58
    rep = series_overlap_report(tr, va)
    assert rep == {
        "train_images": 2417, "valid_images": 117, "train_series": 470, "valid_series": 102,
        "shared_series": 58, "train_images_in_shared": 405, "valid_images_in_shared": 71,
    }
    clean = drop_shared_series(va, tr)
    assert len(clean) == 117 - 71
    assert lungct_series_overlap(tr, clean) == set()
    # split_by_patient keeps augmented copies (same series_id) together
    for r in tr:
        r["series_id"] = lungct_series_id(r["file_name"])
    s = split_by_patient(tr, seed=0)
    assert lungct_series_overlap(s["train"], s["test"]) == set()


def test_lungct_disjoint_split_real_data(data_root):
    """Issue 10: no LUNA16 series on two sides; augmented copies of a slice stay together;
    val/test hold one image per source slice; stable across calls and processes (seeded)."""
    from mdkd_det.data.catalog import DatasetCatalog
    from mdkd_det.data.datasets.builtin import register_builtin
    from mdkd_det.data.datasets.splits import lungct_slice_key

    register_builtin(str(data_root), split_seed=0, split_fractions=(0.65, 0.15, 0.20))
    d = {s: DatasetCatalog.get(f"lungct_disjoint_{s}") for s in ("train", "val", "test")}
    series = {s: {r["series_id"] for r in recs} for s, recs in d.items()}
    assert not (series["train"] & series["val"] or series["train"] & series["test"]
                or series["val"] & series["test"])
    assert sum(len(v) for v in series.values()) == 514  # every series of train + valid, once
    slices = {s: [lungct_slice_key(r["file_name"]) for r in recs] for s, recs in d.items()}
    assert not (set(slices["train"]) & (set(slices["val"]) | set(slices["test"])))
    for s in ("val", "test"):
        assert len(slices[s]) == len(set(slices[s]))  # one image per source slice
    ids = [r["image_id"] for recs in d.values() for r in recs]
    assert len(ids) == len(set(ids))
    # 807 train slices x 3 copies (4 slices have 2, 1 has 1) + 117 valid images, before de-dup
    n_train_copies = sum(1 for r in d["train"])
    assert n_train_copies + len(d["val"]) + len(d["test"]) < 2417 + 117
    again = DatasetCatalog.get("lungct_disjoint_test")
    assert [r["file_name"] for r in again] == [r["file_name"] for r in d["test"]]
    # fixed by seed: these counts are what the shipped configs use (seed 0, 65/15/20)
    assert (len(series["train"]), len(series["val"]), len(series["test"])) == (334, 77, 103)
    register_builtin(str(data_root))  # restore the defaults for later tests


def test_split_labeled_hand_case():
    """10 patients, 10 %: one patient keeps its labels, nine lose them; disjoint, seeded."""
    recs = _recs(10)
    for r in recs:
        r["annotations"] = [{"bbox": [0, 0, 1, 1], "category_id": 0}]
    out = split_labeled(recs, 0.1, seed=3)
    assert len(_patients(out["labeled"])) == 1 and len(_patients(out["unlabeled"])) == 9
    assert not _patients(out["labeled"]) & _patients(out["unlabeled"])
    assert all(r["annotations"] for r in out["labeled"])
    assert all(r["annotations"] == [] and r["unlabeled"] for r in out["unlabeled"])
    assert all(r["annotations"] for r in recs)  # the input is not modified
    assert split_labeled(list(reversed(recs)), 0.1, seed=3)["labeled"][0]["patient_id"] == \
        out["labeled"][0]["patient_id"]
    assert len(split_labeled(recs, 1.0)["unlabeled"]) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(DatasetError, match="label fraction"):
            split_labeled(recs, bad)


def test_lungct_labeled_unlabeled_real_data(data_root, tmp_path):
    """The 10 % LungCT split: series-disjoint halves of lungct_disjoint_train; the unlabelled
    half is refused as a supervised training set with a one-line error."""
    from mdkd_det.config import get_cfg
    from mdkd_det.data.build import get_dataset_records

    cfg = get_cfg()
    cfg.DATASETS.ROOT = str(data_root)
    cfg.DATASETS.SPLIT_FRACTIONS = [0.65, 0.15, 0.20]
    train = get_dataset_records(cfg, ["lungct_disjoint_train"])
    lab = get_dataset_records(cfg, ["lungct_disjoint_train_labeled"])
    unl = get_dataset_records(cfg, ["lungct_disjoint_train_unlabeled"])
    s_lab, s_unl = {r["series_id"] for r in lab}, {r["series_id"] for r in unl}
    assert (len(s_lab), len(s_unl)) == (33, 301) and not s_lab & s_unl
    assert len(lab) + len(unl) == len(train)
    assert sum(len(r["annotations"]) for r in unl) == 0
    with pytest.raises(DatasetError, match="lungct_disjoint_train_unlabeled.*unlabelled"):
        get_dataset_records(cfg, ["lungct_disjoint_train_unlabeled"], check_classes=True)
