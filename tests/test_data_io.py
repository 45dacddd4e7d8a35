"""Tests for mdkd_det.data.io (readers, windowing, reader errors)."""

import glob
import os

import cv2
import numpy as np
import pydicom
import pytest

from mdkd_det.data.io import DEFAULT_WINDOW, hu_to_unit, read_hu, read_image, resolve_window
from mdkd_det.utils.errors import DatasetError


def _first_dicom(data_root):
    files = sorted(glob.glob(str(data_root / "lung_pet_ct_dx_sample" / "**" / "*.dcm"), recursive=True))
    assert files, "no DICOM in the shared data"
    return files[0]


# ----------------------------------------------------------------------------- windowing


def test_hu_to_unit_hand_values():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 900.0, -975.0])
    out = hu_to_unit(hu, -600, 1500)  # lung window -> [-1350, 150] HU
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 0.25], atol=1e-6)


def test_hu_to_unit_other_window_and_shape():
    hu = np.array([[-160.0, 40.0], [240.0, 1000.0]])
    out = hu_to_unit(hu, 40, 400)  # [-160, 240]
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 0.5], [1.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("width", [0, -10, float("nan")])
def test_hu_to_unit_bad_width(width):
    with pytest.raises(DatasetError, match="width"):
        hu_to_unit(np.zeros(3), -600, width)


def test_resolve_window_precedence():
    assert resolve_window({}) == DEFAULT_WINDOW == (-600.0, 1500.0)
    assert resolve_window({}, (40, 400)) == (40.0, 400.0)
    assert resolve_window({"window": (50, 350)}, (40, 400)) == (50.0, 350.0)
    with pytest.raises(DatasetError, match="x.png"):
        resolve_window({"file_name": "x.png", "window": "abc"})


# ----------------------------------------------------------------------------- 8-bit reader


def test_image_reader_rgb_identical_channels(tmp_path):
    grey = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    path = str(tmp_path / "rgb.png")
    cv2.imwrite(path, np.dstack([grey, grey, grey]))
    img = read_image({"file_name": path, "reader": "image", "height": 16, "width": 16})
    assert img.shape == (16, 16) and img.dtype == np.float32
    np.testing.assert_allclose(img, grey / 255.0, atol=1e-6)


def test_image_reader_window_ignored(tmp_path):
    path = str(tmp_path / "g.png")
    cv2.imwrite(path, np.full((4, 5), 51, np.uint8))
    img = read_image({"file_name": path, "reader": "image", "window": (0, 10)}, window=(1, 2))
    np.testing.assert_allclose(img, 0.2, atol=1e-6)


def test_image_reader_real_lungct_jpeg(data_root):
    path = sorted(glob.glob(str(data_root / "lungct_roboflow" / "valid" / "*.jpg")))[0]
    img = read_image({"file_name": path, "reader": "image", "height": 512, "width": 512})
    assert img.shape == (512, 512) and img.dtype == np.float32
    assert 0.0 <= img.min() < 0.1 and 0.9 < img.max() <= 1.0
    rgb = cv2.imread(path, cv2.IMREAD_COLOR)
    # channels are identical copies: grey equals any channel up to JPEG rounding
    assert np.abs(img * 255 - rgb[..., 1].astype(np.float32)).max() <= 2


# ----------------------------------------------------------------------------- 16-bit PNG


def _write_png16(path, hu):
    assert cv2.imwrite(str(path), (np.asarray(hu) + 32768).astype(np.uint16))


def test_png16_hu_reader(tmp_path):
    hu = np.array([[-1350, -600, 150], [-32768, 0, 2000]], dtype=np.int32)
    path = tmp_path / "s.png"
    _write_png16(path, hu)
    rec = {"file_name": str(path), "reader": "png16_hu", "height": 2, "width": 3}
    np.testing.assert_array_equal(read_hu(rec), hu.astype(np.float32))
    np.testing.assert_allclose(read_image(rec), [[0, 0.5, 1], [0, 0.9, 1]], atol=1e-6)
    # argument window, then per-record window override
    np.testing.assert_allclose(read_image(rec, window=(0, 4000))[1], [0, 0.5, 1.0], atol=1e-6)
    rec["window"] = (-600, 3000)  # [-2100, 900]
    np.testing.assert_allclose(read_image(rec, window=(0, 4000))[0], [0.25, 0.5, 0.75], atol=1e-6)


def test_png16_reader_rejects_8bit_png(tmp_path):
    path = str(tmp_path / "eight.png")
    cv2.imwrite(path, np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="eight.png.*16-bit"):
        read_image({"file_name": path, "reader": "png16_hu"})


def test_image_reader_rejects_16bit_png(tmp_path):
    path = tmp_path / "sixteen.png"
    _write_png16(path, np.zeros((4, 4)))
    with pytest.raises(DatasetError, match="sixteen.png.*png16_hu"):
        read_image({"file_name": str(path), "reader": "image"})


# ----------------------------------------------------------------------------- DICOM


def test_dicom_reader_real(data_root):
    path = _first_dicom(data_root)
    ds = pydicom.dcmread(path)
    expected_hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rec = {"file_name": path, "reader": "dicom", "height": 512, "width": 512}
    hu = read_hu(rec)
    np.testing.assert_array_equal(hu, expected_hu)
    assert float(ds.RescaleIntercept) == -1024.0
    img = read_image(rec)
    np.testing.assert_allclose(img, np.clip((expected_hu + 1350) / 1500, 0, 1), atol=1e-6)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.1


def test_dicom_without_pixel_data(data_root, tmp_path):
    ds = pydicom.dcmread(_first_dicom(data_root))
    del ds.PixelData
    path = str(tmp_path / "nopixels.dcm")
    ds.save_as(path)
    with pytest.raises(DatasetError, match="nopixels.dcm.*PixelData"):
        read_image({"file_name": path, "reader": "dicom"})


def test_non_dicom_file(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(DatasetError, match="fake.dcm"):
        read_image({"file_name": str(path), "reader": "dicom"})


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("reader", ["image", "png16_hu", "dicom"])
def test_missing_file(tmp_path, reader):
    path = str(tmp_path / "nope" / "missing.png")
    with pytest.raises(DatasetError, match="missing.png"):
        read_image({"file_name": path, "reader": reader})


@pytest.mark.parametrize("reader", ["image", "png16_hu"])
def test_undecodable_image(tmp_path, reader):
    path = tmp_path / "broken.jpg"
    path.write_bytes(os.urandom(300))
    with pytest.raises(DatasetError, match="broken.jpg"):
        read_image({"file_name": str(path), "reader": reader})


@pytest.mark.parametrize("reader", ["image", "png16_hu", "dicom"])
def test_zero_byte_image(tmp_path, reader):
    """Was a cv2.error traceback (``!buf.empty()``) for the OpenCV readers (issue 13)."""
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png"):
        read_image({"file_name": str(path), "reader": reader})


def test_unknown_reader_and_size_mismatch(tmp_path):
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match="unknown reader"):
        read_image({"file_name": path, "reader": "nifti"})
    with pytest.raises(DatasetError, match="a.png.*4x6"):
        read_image({"file_name": path, "reader": "image", "height": 6, "width": 4})
    with pytest.raises(DatasetError, match="no HU"):
        read_hu({"file_name": path, "reader": "image"})
