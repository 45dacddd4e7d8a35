"""tools/predict.py / mdkd-predict (issue 12) on the real Lung-PET-CT-Dx series and on a NIfTI
written here: slice order, COCO outputs that reload, overlays, 3-D candidates in voxels and mm,
the same detections from DICOM and NIfTI, one-line errors for bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdkd_det.data.io import read_hu
from mdkd_det.data.volume import RAS_TO_LPS, load_dicom_series, load_nifti
from mdkd_det.engine import DefaultTrainer
from mdkd_det.engine.predict_cli import load_predictions, main
from mdkd_det.evaluation.candidates3d import candidate_boxes, link_detections

from _tiny import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
A0001 = "lung_pet_ct_dx_sample/Lung-PET-CT-Dx/manifest-1675442780019/Lung-PET-CT-Dx/Lung_Dx-A0001"
SERIES = A0001 + "/04-04-2007-NA-Chest-07990/2.000000-5mm-40805"  # 11 slices, z = -234 .. -184 mm


@pytest.fixture(scope="module")
def model(tmp_path_factory, data_root):
    """(config.yaml, model_final.pth) of a tiny Faster R-CNN trained 2 iterations on LungCT."""
    out = tmp_path_factory.mktemp("model")
    cfg = tiny_cfg(out, max_iter=2, **{"DATASETS.TEST": "()", "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    DefaultTrainer(cfg).train()
    (out / "config.yaml").write_text(cfg.dump())
    return str(out / "config.yaml"), str(out / "model_final.pth")


def _run(model, inputs, out, *extra):
    return main(["--config-file", model[0], "--weights", model[1], "--input", *map(str, inputs),
                 "--output", str(out), "--batch-size", "3", "--score-thresh", "0.0", *extra])


def test_series_order_and_geometry(data_root):
    v = load_dicom_series(sorted(str(p) for p in (data_root / SERIES).glob("*.dcm")))
    assert v.shape == (11, 512, 512)
    # ordered along the normal (0, 0, 1): inferior (z = -234, file 1-23) -> superior (1-13)
    assert Path(v.files[0]).name == "1-23.dcm" and Path(v.files[-1]).name == "1-13.dcm"
    np.testing.assert_allclose(v.affine[:3, 3], [-228.036842, -93.0631599, -234.0])
    np.testing.assert_allclose(np.diag(v.affine)[:3], [0.841796875, 0.841796875, 5.0])
    # candidate on slices 2..3, box x 100..110 px, y 200..220 px -> hand-computed mm
    c = {"z0": 2, "z1": 3, "boxes": [[100, 200, 110, 220], [102, 198, 108, 221]]}
    b = candidate_boxes(c, v)
    assert b["box_voxel"] == [100.0, 198.0, 1.5, 110.0, 221.0, 3.5]
    s = 0.841796875
    np.testing.assert_allclose(b["box_mm"], [-228.036842 + 99.5 * s, -93.0631599 + 197.5 * s, -234 + 1.5 * 5,
                                             -228.036842 + 109.5 * s, -93.0631599 + 220.5 * s, -234 + 3.5 * 5])


def test_link_detections_hand_example():
    t = torch.tensor
    per_slice = [
        {"boxes": t([[10., 10, 20, 20], [50, 50, 60, 60]]), "scores": np.array([0.9, 0.4]), "labels": t([1, 1])},
        {"boxes": t([[11., 11, 21, 21]]), "scores": np.array([0.7]), "labels": t([1])},      # IoU 0.68 -> joins
        {"boxes": t([[0., 0, 5, 5]]), "scores": np.array([0.2]), "labels": t([1])},          # below link score
        {"boxes": t([[11., 11, 21, 21]]), "scores": np.array([0.8]), "labels": t([1])},      # gap of 1 slice
    ]
    c = link_detections(per_slice, iou_thresh=0.3, max_gap=0, score_thresh=0.3)
    assert [(x["z0"], x["z1"], x["max_score"]) for x in c] == [(0, 1, 0.9), (3, 3, 0.8), (0, 0, 0.4)]
    c = link_detections(per_slice, iou_thresh=0.3, max_gap=1, score_thresh=0.3)
    assert [(x["slices"], x["max_score"]) for x in c] == [([0, 1, 3], 0.9), ([0], 0.4)]
    assert c[0]["mean_score"] == pytest.approx((0.9 + 0.7 + 0.8) / 3)


def _write_nifti_like_dcm2niix(volume, path):
    """The series as a NIfTI in RAS+ voxel order (x and y flipped, as converters write it)."""
    nib = pytest.importorskip("nibabel")
    hu = np.stack([read_hu({"file_name": f, "reader": "dicom"}) for f in volume.files])  # [Z, Y, X]
    data = np.transpose(hu, (2, 1, 0))[::-1, ::-1, :]  # [X, Y, Z] with i -> R, j -> A
    nx, ny = data.shape[:2]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3], flip[1, 1], flip[1, 3] = -1, nx - 1, -1, ny - 1
    affine = RAS_TO_LPS @ volume.affine @ flip  # voxel (i, j, k) -> RAS mm
    img = nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), affine)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
    return hu


def test_dicom_series_and_nifti(model, data_root, tmp_path):
    # whole patient folder: two real series (11 + 9 slices)
    out = tmp_path / "dcm"
    assert _run(model, [data_root / A0001], out, "--vis-thresh", "0.0", "--max-overlays", "2") == 0
    imgs = json.loads((out / "images.json").read_text())["images"]
    assert len(imgs) == 20 and {i["volume"] for i in imgs} == {"2.000000-5mm-40805", "3.000000-5mm-41315"}
    assert len(list((out / "overlays").rglob("*.png"))) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices"] == 20 and [v["slices"] for v in summary["volumes"]] == [11, 9]
    cands = json.loads((out / "candidates_3d.json").read_text())
    assert cands and all(c["z0"] <= c["z1"] and len(c["box_mm"]) == 6 for c in cands)
    assert (out / "candidates_3d.csv").read_text().count("\n") == len(cands) + 1
    # the results reload (pycocotools) and by file name
    from pycocotools.coco import COCO

    gt = COCO(str(out / "images.json"))
    res = gt.loadRes(str(out / "coco_instances_results.json"))
    pred = load_predictions(str(out))
    assert len(res.getAnnIds()) == sum(len(v) for v in pred.values()) > 0
    # the same series as NIfTI: same slices, detections and mm boxes
    v = load_dicom_series(sorted(str(p) for p in (data_root / SERIES).glob("*.dcm")))
    nii = tmp_path / "series.nii.gz"
    hu = _write_nifti_like_dcm2niix(v, nii)
    nv = load_nifti(str(nii))
    np.testing.assert_array_equal(nv.hu, hu)
    np.testing.assert_allclose(nv.affine, v.affine, atol=1e-4)
    out2 = tmp_path / "nii"
    assert _run(model, [nii, data_root / SERIES], out2) == 0
    p2 = load_predictions(str(out2))
    dcm_files = [f for f in p2 if f.endswith(".dcm")]
    assert len(dcm_files) == 11
    for z, f in enumerate(v.files):
        assert p2[f"{os.path.abspath(nii)}#z={z}"] == p2[f]
    c2 = json.loads((out2 / "candidates_3d.json").read_text())
    by_vol = {}
    for c in c2:
        by_vol.setdefault(c["volume"], []).append(c)
    a, b = by_vol["series"], by_vol["2.000000-5mm-40805"]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x["z0"], x["z1"], x["max_score"]) == (y["z0"], y["z1"], y["max_score"])
        np.testing.assert_allclose(x["box_mm"], y["box_mm"], atol=1e-3)


def test_images_glob(model, data_root, tmp_path):
    pattern = str(data_root / "lungct_roboflow" / "valid" / "*.jpg")
    assert _run(model, [pattern], tmp_path / "o", "--max-overlays", "0") == 0
    n = len(json.loads((tmp_path / "o" / "images.json").read_text())["images"])
    assert n == len(list((data_root / "lungct_roboflow" / "valid").glob("*.jpg")))
    assert not (tmp_path / "o" / "candidates_3d.json").exists()


def test_bad_inputs_one_line_errors(model, data_root, tmp_path, capsys):
    import pydicom

    files = sorted((data_root / SERIES).glob("*.dcm"))[:2]
    pet = tmp_path / "pet"
    pet.mkdir()
    ds = pydicom.dcmread(files[0])
    ds.Modality = "PT"
    ds.save_as(pet / "pt.dcm")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(files[0], mixed / "a.dcm")
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(mixed / "b.dcm")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    bad_nii = tmp_path / "bad.nii.gz"
    bad_nii.write_bytes(b"not a nifti at all")
    cases = {pet: "pt.dcm: Modality is 'PT', not CT", mixed: "b.dcm: ImageOrientationPatient",
             empty: "empty: empty folder", bad_nii: "bad.nii.gz: unreadable NIfTI",
             tmp_path / "missing": "missing: no such file"}
    for path, msg in cases.items():
        capsys.readouterr()
        assert _run(model, [path], tmp_path / "o") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mdkd-predict: error: ") and msg in err and "\n" not in err, err
    # no weights: refuse
    assert main(["--config-file", model[0], "--input", str(files[0])]) == 2
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err


def test_overlay_small_box_inset(tmp_path):
    from mdkd_det.evaluation.visualize import save_overlay

    img = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    p = save_overlay(img, [[10, 10, 20, 18], [40, 40, 100, 110]], [0.9, 0.6], [1, 1], str(tmp_path / "o.png"),
                     title="t", score_thresh=0.5)
    import cv2

    assert cv2.imread(p).shape[0] > 128


def test_help_has_examples():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "predict.py"), "--help"], capture_output=True,
                       text=True, cwd=str(REPO))
    assert r.returncode == 0 and "examples:" in r.stdout and "--input" in r.stdout
