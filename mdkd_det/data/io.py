"""Image readers: one record -> one grey float image in [0, 1].

Three readers, chosen by ``record["reader"]`` (record schema: ``mdkd_det/data/catalog.py``):

``"image"``     8-bit JPEG/PNG (RGB with identical channels or grey). Decoded with OpenCV
                ``IMREAD_GRAYSCALE``, divided by 255. These images are already windowed by
                whoever exported them (LungCT, DeepLesion JPEG samples), so no CT window is
                applied and the HU values are not recoverable.
``"png16_hu"``  16-bit PNG as released by DeepLesion: decoded with ``IMREAD_UNCHANGED`` (never
                converted to 8 bit), HU = value - 32768, then windowed.
``"dicom"``     DICOM slice read with pydicom; HU via the modality LUT
                (HU = pixel * RescaleSlope + RescaleIntercept), then windowed.

Windowing (:func:`hu_to_unit`): a window ``(level, width)`` in HU maps
``[level - width/2, level + width/2]`` linearly onto ``[0, 1]`` and clips outside values. The
window is, in order of precedence: ``record["window"]``, the ``window`` argument of
:func:`read_image`, :data:`DEFAULT_WINDOW` (lung window WL -600 / WW 1500 = [-1350, 150] HU;
paper_notes A23). Files are read as bytes and decoded in memory (``cv2.imdecode``), so paths
with spaces or non-ASCII characters work on every platform.

Every failure raises :class:`~mdkd_det.utils.errors.DatasetError` naming the file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..utils.errors import DatasetError

__all__ = ["DEFAULT_WINDOW", "READERS", "hu_to_unit", "read_hu", "read_image", "reader_for_path",
           "resolve_window"]

#: Lung window (level, width) in HU: WL -600 / WW 1500 -> [-1350, 150] HU (paper_notes A23).
DEFAULT_WINDOW: Tuple[float, float] = (-600.0, 1500.0)
#: Reader names accepted in ``record["reader"]``.
READERS = ("image", "png16_hu", "dicom")
#: Offset of DeepLesion's 16-bit PNGs: HU = stored value - 32768.
PNG16_HU_OFFSET = 32768

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hu_to_unit(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Window HU values to ``[0, 1]``.

    Args:
        hu: array of any shape, HU.
        level: window centre, HU.
        width: window width, HU (> 0).

    Returns:
        float32 array of the same shape: ``clip((hu - (level - width/2)) / width, 0, 1)``.

    Raises:
        DatasetError: ``width`` is not a positive finite number or ``level`` is not finite.

    Source: the DICOM VOI linear window (PS3.3 C.11.2.1.2) without the DICOM's half-pixel
    offsets, as used by common CT pipelines.
    """
    level = float(level)
    width = float(width)
    if not (np.isfinite(level) and np.isfinite(width)) or width <= 0:
        raise DatasetError(f"bad CT window (level={level}, width={width}): width must be > 0")
    lo = level - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def resolve_window(
    record: Mapping[str, Any], window: Optional[Sequence[float]] = None
) -> Tuple[float, float]:
    """Return the ``(level, width)`` in HU used for ``record``.

    Precedence: ``record["window"]`` (per-record, e.g. DeepLesion's DICOM_windows), then
    ``window``, then :data:`DEFAULT_WINDOW`.

    Raises:
        DatasetError: the chosen window is not a pair of numbers (message names the file).
    """
    chosen = record.get("window")
    if chosen is None:
        chosen = window if window is not None else DEFAULT_WINDOW
    try:
        level, width = (float(v) for v in chosen)
    except (TypeError, ValueError):
        raise DatasetError(
            f"{record.get('file_name', '<no file_name>')}: window must be (level, width) in HU, "
            f"got {chosen!r}"
        ) from None
    return level, width


#: File-name endings read as DICOM by :func:`reader_for_path`.
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
#: File-name endings read as 8-bit images (PNG is checked for 16 bit first).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def reader_for_path(path: str) -> str:
    """The reader name (:data:`READERS`) for an image file, from its name and first bytes.

    Rules: ``.dcm``/``.dicom``/``.ima`` -> ``"dicom"``; ``.jpg``/``.jpeg`` (and other 8-bit
    formats) -> ``"image"``; a PNG whose IHDR bit depth is 16 -> ``"png16_hu"`` (DeepLesion
    convention, HU = value - 32768), other PNGs -> ``"image"``; any other name whose bytes
    128-131 are ``DICM`` (a DICOM file without extension, as series folders often hold) ->
    ``"dicom"``; else ``"image"``. Only PNGs and unknown extensions are opened (132 bytes). A
    missing file is classified by its extension; reading it then raises
    :class:`DatasetError` naming it.

    Used by :class:`~mdkd_det.engine.DefaultPredictor` and the ``coco:`` loader, so a COCO JSON
    may list DICOM and 16-bit PNG files (as ``tools/convert_to_coco.py`` writes them).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in DICOM_EXTENSIONS:
        return "dicom"
    if ext in IMAGE_EXTENSIONS and ext != ".png":
        return "image"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "image"
    if head[:8] == _PNG_SIGNATURE:
        return "png16_hu" if len(head) > 24 and head[24] == 16 else "image"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return "dicom" if head[128:132] == b"DICM" else "image"


def _read_bytes(path: str) -> np.ndarray:
    if not path or not os.path.isfile(path):
        raise DatasetError(f"image file not found: {path}")
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read image file {path}: {e}") from e
    if buf.size == 0:
        raise DatasetError(f"cannot decode image {path}: empty (0-byte) file")
    return buf


def _imdecode(buf: np.ndarray, flags: int, path: str, expected: str) -> np.ndarray:
    """``cv2.imdecode`` with every failure (``None`` or a ``cv2.error``) as a DatasetError."""
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as e:
        raise DatasetError(f"cannot decode image {path} (not a {expected}, or corrupt): "
                           f"{' '.join(str(e).split())[:200]}") from e
    if img is None:
        raise DatasetError(f"cannot decode image {path} (not a {expected}, or corrupt)")
    return img


def _read_8bit(path: str) -> np.ndarray:
    buf = _read_bytes(path)
    # IMREAD_GRAYSCALE would silently squash a 16-bit PNG to 8 bit (losing the HU values);
    # refuse it instead and point at the right reader.
    if buf[:8].tobytes() == _PNG_SIGNATURE and buf.size > 24 and int(buf[24]) == 16:
        raise DatasetError(
            f"{path}: 16-bit PNG given to reader 'image' (8-bit only); use reader 'png16_hu'"
        )
    img = _imdecode(buf, cv2.IMREAD_GRAYSCALE, path, "JPEG/PNG")
    return img.astype(np.float32) / np.float32(255.0)


def _read_png16_hu(path: str) -> np.ndarray:
    buf = _read_bytes(path)
    img = _imdecode(buf, cv2.IMREAD_UNCHANGED, path, "PNG")
    if img.dtype != np.uint16:
        raise DatasetError(
            f"{path}: reader 'png16_hu' needs a 16-bit PNG (HU = value - 32768), got {img.dtype}"
        )
    if img.ndim != 2:
        raise DatasetError(f"{path}: reader 'png16_hu' needs a single-channel PNG, got {img.shape}")
    return img.astype(np.float32) - np.float32(PNG16_HU_OFFSET)


def _read_dicom_hu(path: str) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    if not path or not os.path.isfile(path):
        raise DatasetError(f"DICOM file not found: {path}")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DatasetError(f"{path}: not a DICOM file ({e})") from e
    except Exception as e:  # truncated or corrupt files raise various errors in pydicom
        raise DatasetError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise DatasetError(f"{path}: DICOM has no PixelData (not an image)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugin, bad pixel module, ...
        raise DatasetError(f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    if arr.ndim != 2:
        raise DatasetError(
            f"{path}: expected one grey 2D slice, got pixel array of shape {arr.shape}"
        )
    hu = apply_modality_lut(arr, ds)  # pixel * RescaleSlope + RescaleIntercept (or LUT)
    return np.asarray(hu, dtype=np.float32)


def read_hu(record: Mapping[str, Any]) -> np.ndarray:
    """Read the raw HU image of an HU record (reader ``"png16_hu"`` or ``"dicom"``).

    Returns:
        float32 array [H, W] in HU (no windowing).

    Raises:
        DatasetError: reader is not an HU reader, or the file is missing/undecodable (see
            :func:`read_image`).
    """
    reader = record.get("reader", "image")
    path = record.get("file_name", "")
    if reader == "png16_hu":
        return _read_png16_hu(path)
    if reader == "dicom":
        return _read_dicom_hu(path)
    raise DatasetError(f"{path}: reader {reader!r} carries no HU values (need png16_hu or dicom)")


def read_image(record: Mapping[str, Any], window: Optional[Sequence[float]] = None) -> np.ndarray:
    """Read one record's image as a grey float image.

    Args:
        record: dataset record (``file_name``, ``reader``; optional ``window``, ``height``,
            ``width``), see ``catalog.py``.
        window: default ``(level, width)`` in HU for HU readers; ``record["window"]`` overrides
            it; ``None`` -> :data:`DEFAULT_WINDOW`. Ignored by the 8-bit ``"image"`` reader.

    Returns:
        float32 array [H, W] with values in [0, 1].

    Raises:
        DatasetError (message names the file): unknown reader; missing file; undecodable image;
            8-bit PNG given to ``"png16_hu"`` or 16-bit PNG given to ``"image"``; non-DICOM,
            unreadable DICOM or DICOM without PixelData; bad window; decoded size different from
            the record's ``height``/``width``.

    Source: OpenCV (``cv2.imdecode``) for JPEG/PNG, pydicom (``apply_modality_lut``) for DICOM.
    """
    reader = record.get("reader", "image")
    path = record.get("file_name", "")
    if reader == "image":
        img = _read_8bit(path)
    elif reader in ("png16_hu", "dicom"):
        level, width = resolve_window(record, window)
        hu = read_hu(record)
        try:
            img = hu_to_unit(hu, level, width)
        except DatasetError as e:
            raise DatasetError(f"{path}: {e}") from None
    else:
        raise DatasetError(f"{path}: unknown reader {reader!r}; expected one of {READERS}")
    h, w = record.get("height"), record.get("width")
    if h is not None and w is not None and img.shape != (int(h), int(w)):
        raise DatasetError(
            f"{path}: decoded image is {img.shape[0]}x{img.shape[1]} (HxW) but the record says "
            f"{h}x{w}"
        )
    return np.ascontiguousarray(img, dtype=np.float32)
