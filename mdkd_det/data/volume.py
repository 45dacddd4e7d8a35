"""CT volumes for prediction: DICOM series folders and NIfTI files, as ordered axial slices.

A :class:`Volume` is a stack of ``Z`` slices ``[H, W]`` with one geometry: ``affine`` maps a
voxel index ``(column x, row y, slice z, 1)`` to DICOM patient coordinates in mm (LPS+: x to
the patient's left, y posterior, z superior; PS3.3 C.7.6.2.1.1). Slices are ordered along the
slice normal (inferior -> superior for axial series), and shown as DICOM shows them (column
index to the patient's left, row index posterior), so a NIfTI made from a DICOM series gives
the same slices, boxes and mm coordinates as the series itself.

- DICOM series (:func:`load_dicom_series`): pydicom headers; slices sorted by the projection
  of ImagePositionPatient on the normal ``row_dir x col_dir`` (InstanceNumber when the position
  is missing); pixels read per slice, lazily, by the project's reader (:mod:`.io`).
- NIfTI (:func:`load_nifti`): nibabel; the image is reoriented to L, P, S axes
  (``nibabel.orientations``), values are HU (``scl_slope``/``scl_inter`` applied), the world
  coordinates (RAS+) are converted to LPS+ (x and y negated).

Every bad input raises :class:`~mdkd_det.utils.errors.DatasetError` naming the file: a
non-CT DICOM (Modality != CT), a series with mixed orientations or slice sizes, an unreadable
NIfTI, a folder without usable files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..utils.errors import DatasetError

__all__ = ["Volume", "load_dicom_series", "load_nifti", "is_nifti", "dicom_files_by_series",
           "read_dicom_header"]

#: RAS+ -> LPS+ (and back): negate x and y.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """An ordered stack of CT slices with its voxel -> patient (mm, LPS+) geometry.

    Attributes:
        name: a short name (series folder / NIfTI file stem) for output files.
        source: the series folder or NIfTI path.
        shape: ``(Z, H, W)`` voxels.
        affine: ``[4, 4]`` float64, ``affine @ (x, y, z, 1)`` = LPS+ mm of voxel centre
            (column x, row y, slice z).
        files: DICOM: one file per slice, in slice order; NIfTI: empty.
        hu: NIfTI: ``[Z, H, W]`` float32 HU; DICOM: None (slices are read on demand).
        uids: DICOM: SeriesInstanceUID (else "").
    """

    name: str
    source: str
    shape: tuple
    affine: np.ndarray
    files: List[str] = field(default_factory=list)
    hu: Optional[np.ndarray] = None
    uid: str = ""

    def __len__(self) -> int:
        return int(self.shape[0])

    def slice_input(self, z: int) -> Union[str, np.ndarray]:
        """What :class:`~mdkd_det.engine.DefaultPredictor` takes for slice ``z``: the DICOM path,
        or the ``[H, W]`` HU array (NIfTI)."""
        return self.files[z] if self.files else self.hu[z]

    def slice_name(self, z: int) -> str:
        """The slice's ``file_name`` in outputs: the DICOM path, or ``<nifti>#z=<z>``."""
        return self.files[z] if self.files else f"{self.source}#z={z}"

    @property
    def spacing(self) -> tuple:
        """Voxel size ``(x, y, z)`` in mm (column, row, slice), from ``affine``."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(3))

    def voxel_to_mm(self, xyz: np.ndarray) -> np.ndarray:
        """``[N, 3]`` voxel coordinates (column, row, slice; may be fractional) -> ``[N, 3]``
        LPS+ mm."""
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        return xyz @ self.affine[:3, :3].T + self.affine[:3, 3]


# --- DICOM ------------------------------------------------------------------------------------
def read_dicom_header(path: str):
    """pydicom dataset without pixel data, checked to be CT.

    Raises:
        DatasetError: not a DICOM file, unreadable, or Modality != CT (names the file).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise DatasetError(f"{path}: not a DICOM file ({e})") from e
    except Exception as e:  # truncated / corrupt files raise various errors in pydicom
        raise DatasetError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from e
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise DatasetError(f"{path}: Modality is '{modality or 'missing'}', not CT; only CT is supported")
    return ds


def dicom_files_by_series(files: Sequence[str]) -> Dict[str, List[str]]:
    """Group DICOM files by SeriesInstanceUID (checking each is CT), in first-seen order.

    Raises:
        DatasetError: a file that is not a readable CT DICOM (names it).
    """
    groups: Dict[str, List[str]] = {}
    for f in files:
        ds = read_dicom_header(f)
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
    return groups


def load_dicom_series(files: Sequence[str], name: Optional[str] = None) -> Volume:
    """The files of one DICOM CT series as a :class:`Volume` (pixels are not read here).

    Args:
        files: the series' DICOM files (any order).
        name: volume name (default: the folder of the first file).

    Raises:
        DatasetError (naming the file): no files; a non-CT file; files from several series;
            ImageOrientationPatient differing between slices (mixed orientations); slice sizes
            or pixel spacings that differ; missing geometry with several slices.
    """
    if not files:
        raise DatasetError("load_dicom_series: no DICOM files given")
    heads = [(f, read_dicom_header(f)) for f in files]
    f0, d0 = heads[0]
    uids = {str(d.get("SeriesInstanceUID", "")) for _, d in heads}
    if len(uids) > 1:
        raise DatasetError(f"{os.path.dirname(f0)}: files of {len(uids)} series mixed; give one series")
    iop0 = np.asarray(d0.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    size0 = (int(d0.Rows), int(d0.Columns))
    ps0 = np.asarray(d0.get("PixelSpacing", [1.0, 1.0]), dtype=np.float64)
    for f, d in heads[1:]:
        iop = np.asarray(d.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise DatasetError(f"{f}: ImageOrientationPatient {list(np.round(iop, 4))} differs from "
                               f"{list(np.round(iop0, 4))} of {f0} (mixed orientations in one series)")
        if (int(d.Rows), int(d.Columns)) != size0:
            raise DatasetError(f"{f}: slice size {int(d.Rows)}x{int(d.Columns)} differs from "
                               f"{size0[0]}x{size0[1]} of {f0}")
        ps = np.asarray(d.get("PixelSpacing", [1.0, 1.0]), dtype=np.float64)
        if not np.allclose(ps, ps0, atol=1e-4):
            raise DatasetError(f"{f}: PixelSpacing {list(ps)} differs from {list(ps0)} of {f0}")
    row_dir, col_dir = iop0[:3], iop0[3:]  # direction of increasing column index, row index
    normal = np.cross(row_dir, col_dir)
    has_pos = all("ImagePositionPatient" in d for _, d in heads)
    if has_pos:
        key = [float(np.dot(np.asarray(d.ImagePositionPatient, dtype=np.float64), normal)) for _, d in heads]
    elif all("InstanceNumber" in d for _, d in heads):
        key = [float(d.InstanceNumber) for _, d in heads]
    elif len(heads) > 1:
        raise DatasetError(f"{f0}: neither ImagePositionPatient nor InstanceNumber: cannot order the slices")
    else:
        key = [0.0]
    order = np.argsort(np.asarray(key), kind="stable")
    heads = [heads[i] for i in order]
    first = np.asarray(heads[0][1].get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    if has_pos and len(heads) > 1:
        last = np.asarray(heads[-1][1].ImagePositionPatient, dtype=np.float64)
        step = (last - first) / (len(heads) - 1)
    else:
        step = normal * float(d0.get("SpacingBetweenSlices", d0.get("SliceThickness", 1.0)) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]  # column index x: PixelSpacing[1] = column spacing
    affine[:3, 1] = col_dir * ps0[0]  # row index y: PixelSpacing[0] = row spacing
    affine[:3, 2] = step
    affine[:3, 3] = first
    folder = os.path.dirname(os.path.abspath(heads[0][0]))
    return Volume(name=name or os.path.basename(folder), source=folder,
                  shape=(len(heads),) + size0, affine=affine, files=[f for f, _ in heads],
                  uid=next(iter(uids)))


# --- NIfTI ------------------------------------------------------------------------------------
def is_nifti(path: str) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` names."""
    p = path.lower()
    return p.endswith(".nii") or p.endswith(".nii.gz")


def load_nifti(path: str) -> Volume:
    """A NIfTI CT volume (HU) as a :class:`Volume` of axial slices in DICOM display orientation.

    Needs ``nibabel`` (``pip install mdkd_det[nifti]``).

    Raises:
        DatasetError: nibabel missing, the file unreadable / not NIfTI, not 2-D or 3-D (a 4-D
            image must have one volume), or a non-finite affine (names the file).
    """
    try:
        import nibabel as nib
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
    except ImportError:
        raise DatasetError(f"{path}: reading NIfTI needs nibabel: pip install 'mdkd_det[nifti]'") from None
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: NIfTI file not found")
    try:
        img = nib.load(path)
        if len(img.shape) == 4 and img.shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) == 2:
            img = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine, img.header)
        if len(img.shape) != 3:
            raise DatasetError(f"{path}: NIfTI of shape {img.shape}; expected one 3-D CT volume")
        if not np.all(np.isfinite(img.affine)):
            raise DatasetError(f"{path}: NIfTI affine is not finite")
        img = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(("L", "P", "S"))))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # [X, Y, Z] (i -> L, j -> P, k -> S), HU
    except DatasetError:
        raise
    except Exception as e:  # nibabel raises ImageFileError, EOFError, zlib errors, ...
        raise DatasetError(f"{path}: unreadable NIfTI ({type(e).__name__}: {e})") from e
    hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))  # [Z, rows (y), columns (x)]
    affine = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    base = os.path.basename(path)
    stem = base[:-7] if base.lower().endswith(".nii.gz") else os.path.splitext(base)[0]
    return Volume(name=stem, source=os.path.abspath(path), shape=hu.shape, affine=affine, hu=hu)
