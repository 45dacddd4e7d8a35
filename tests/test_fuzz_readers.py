"""Property-based fuzz of the annotation/header readers on corrupted real files (issue 13).

Each example takes a real file from the shared data (LungCT COCO JSON, a Lung-PET-CT-Dx VOC XML
and its DICOM slice, DeepLesion's DL_info.csv fragment), corrupts it at random (structure-aware
edits: replaced/deleted/duplicated values with hostile numbers such as ``nan``, ``inf``,
``1e400``, wrong types; then possibly byte-level damage: truncation, overwritten or inserted
bytes) and runs the reader. The property: the reader either returns records whose boxes and
sizes are finite (no NaN box), or raises :class:`DatasetError` with a one-line message; never
another exception. A hang would trip the test's timeout.

Budgets: ``FUZZ_EXAMPLES`` per reader in the normal suite (under a minute for all four), and
``FUZZ_EXAMPLES_SLOW`` in the ``slow`` variants.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mdkd_det.utils.errors import DatasetError  # noqa: E402

FUZZ_EXAMPLES = 60
FUZZ_EXAMPLES_SLOW = 1500
DATA = Path(os.environ.get("MDKD_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "data"))

pytestmark = pytest.mark.skipif(not (DATA / "lungct_roboflow").is_dir(), reason="shared data not found")

#: Values a hostile or broken exporter writes where a number belongs.
HOSTILE_TEXT = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "0", "-1", "-0", "1e-300",
                "", " ", "abc", "1,2", "9" * 40, "0x10", "٣", "1_000", "None", "[]", "\x00"]
HOSTILE_JSON = [None, True, False, 0, -1, 1e400, float("nan"), float("-inf"), 2 ** 70, "", "x", "1e400",
                [], {}, [1, 2], {"a": 1}, [0, 0, "nan", 1]]

json_values = st.recursive(
    st.sampled_from(HOSTILE_JSON) | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
hostile_text = st.sampled_from(HOSTILE_TEXT) | st.text(max_size=12)


def _one_line_error(e: BaseException) -> None:
    assert isinstance(e, DatasetError), f"{type(e).__name__}: {e}"
    assert "\n" not in str(e), repr(str(e))


def _check_records(records) -> None:
    """Loaded: every size and box is finite (a NaN box would poison training silently)."""
    for r in records:
        for k in ("height", "width"):
            assert isinstance(r[k], int), r
        for a in r.get("annotations", []):
            assert len(a["bbox"]) == 4 and all(math.isfinite(float(v)) for v in a["bbox"]), a


def _run(load):
    try:
        records = load()
    except DatasetError as e:
        _one_line_error(e)
        return "error"
    except Exception as e:  # noqa: BLE001 - the property under test
        raise AssertionError(f"reader raised {type(e).__name__} (not DatasetError): {e}") from e
    _check_records(records)
    return "loaded"


def _damage_bytes(data, raw: bytes, limit: int = 0) -> bytes:
    """Maybe truncate / overwrite / insert bytes (in ``raw[:limit]`` when ``limit``)."""
    span = min(len(raw), limit) if limit else len(raw)
    kind = data.draw(st.sampled_from(["none", "none", "truncate", "overwrite", "insert"]))
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw)))]
    if kind in ("overwrite", "insert"):
        pos = data.draw(st.integers(0, max(span - 1, 0)))
        junk = data.draw(st.binary(min_size=1, max_size=16))
        tail = raw[pos + len(junk):] if kind == "overwrite" else raw[pos:]
        return raw[:pos] + junk + tail
    return raw


# ---- COCO JSON ------------------------------------------------------------------------------
def _coco_source() -> dict:
    coco = json.loads((DATA / "lungct_roboflow" / "valid" / "_annotations.coco.json").read_text())
    coco["images"] = coco["images"][:4]
    keep = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return coco


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate_json(data, obj):
    paths = [p for p in _paths(obj) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = obj
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            action = data.draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
            if action == "replace":
                parent[key] = data.draw(json_values)
            elif action == "delete":
                del parent[key]
            elif isinstance(parent, list):
                parent.append(parent[key])
        except (KeyError, IndexError, TypeError):  # an earlier edit changed the shape
            continue
    return obj


def _fuzz_coco(tmp_path, data):
    from mdkd_det.data.datasets.coco import load_coco_json

    obj = _mutate_json(data, _coco_source())
    raw = json.dumps(obj, allow_nan=True).encode()
    f = tmp_path / "ann.json"
    f.write_bytes(_damage_bytes(data, raw))
    return _run(lambda: load_coco_json(str(f), str(tmp_path), dataset_name=None))


# ---- VOC XML and DICOM header (Lung-PET-CT-Dx) ---------------------------------------------
def _lpcd_pair():
    """(xml path, dcm path) of one annotated slice of the sample."""
    import pydicom

    ann = DATA / "lung_pet_ct_dx_sample" / "Annotation"
    xmls = {p.stem: p for p in ann.rglob("*.xml")}
    for dcm in sorted((DATA / "lung_pet_ct_dx_sample").rglob("*.dcm")):
        uid = str(pydicom.dcmread(str(dcm), stop_before_pixels=True).SOPInstanceUID)
        if uid in xmls:
            return xmls[uid], dcm
    raise RuntimeError("no annotated slice in the sample")


_PAIR = None


def _pair():
    global _PAIR
    if _PAIR is None:
        _PAIR = _lpcd_pair()
    return _PAIR


def _lpcd_dirs(tmp_path, xml_bytes: bytes, dcm_bytes: bytes):
    xml, dcm = _pair()
    root = tmp_path / "lpcd"
    if root.exists():
        shutil.rmtree(root)
    (root / "Annotation" / "A0001").mkdir(parents=True)
    (root / "Lung_Dx-A0001").mkdir()
    (root / "Annotation" / "A0001" / xml.name).write_bytes(xml_bytes)
    (root / "Lung_Dx-A0001" / "1-1.dcm").write_bytes(dcm_bytes)
    return root


def _mutate_xml(data, text: str) -> bytes:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text)
    elems = list(root.iter())
    for _ in range(data.draw(st.integers(1, 3))):
        el = data.draw(st.sampled_from(elems))
        action = data.draw(st.sampled_from(["text", "text", "text", "remove", "duplicate"]))
        if action == "text":
            el.text = data.draw(hostile_text)
        else:
            for parent in root.iter():
                if el in list(parent):
                    if action == "remove":
                        parent.remove(el)
                    else:
                        parent.append(el)
                    break
    try:
        return ET.tostring(root)
    except ValueError:  # text ElementTree cannot serialise (e.g. NUL)
        return text.encode()


def _fuzz_voc(tmp_path, data):
    from mdkd_det.data.datasets.lung_pet_ct_dx import load_lung_pet_ct_dx

    xml, dcm = _pair()
    raw = _damage_bytes(data, _mutate_xml(data, xml.read_text()))
    root = _lpcd_dirs(tmp_path, raw, dcm.read_bytes())
    return _run(lambda: load_lung_pet_ct_dx(str(root), str(root / "Annotation")))


def _fuzz_dicom_header(tmp_path, data):
    from mdkd_det.data.datasets.lung_pet_ct_dx import load_lung_pet_ct_dx
    from mdkd_det.data.io import read_hu

    xml, dcm = _pair()
    raw = dcm.read_bytes()
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _damage_bytes(data, raw, limit=2048)  # the header (pixel data starts later)
    root = _lpcd_dirs(tmp_path, xml.read_bytes(), raw)

    def load():
        recs = load_lung_pet_ct_dx(str(root), str(root / "Annotation"))
        for r in recs:  # the pixel reader on the same damaged file
            hu = read_hu(r)
            assert hu.ndim == 2
        return recs

    return _run(load)


# ---- DL_info.csv (DeepLesion) --------------------------------------------------------------
def _fuzz_dl_info(tmp_path, data):
    import csv
    import io

    from mdkd_det.data.datasets.deeplesion import load_deeplesion

    src = (DATA / "deeplesion_dl_info_fragment" / "DL_info_fragment.csv").read_text()
    rows = list(csv.reader(io.StringIO(src)))[:6]
    for _ in range(data.draw(st.integers(1, 3))):
        r = data.draw(st.integers(0, len(rows) - 1))
        action = data.draw(st.sampled_from(["cell", "cell", "cell", "drop_cell", "drop_row", "dup_row"]))
        if action == "cell" and rows[r]:
            rows[r][data.draw(st.integers(0, len(rows[r]) - 1))] = data.draw(hostile_text)
        elif action == "drop_cell" and rows[r]:
            del rows[r][data.draw(st.integers(0, len(rows[r]) - 1))]
        elif action == "drop_row" and len(rows) > 1:
            del rows[r]
        elif action == "dup_row":
            rows.append(list(rows[r]))
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    f = tmp_path / "DL_info.csv"
    f.write_bytes(_damage_bytes(data, out.getvalue().encode("utf-8", "surrogatepass")))
    return _run(lambda: load_deeplesion(str(f), str(tmp_path), lesion_types=None, check_images=False))


READERS = {"coco_json": _fuzz_coco, "voc_xml": _fuzz_voc, "dicom_header": _fuzz_dicom_header,
           "dl_info_csv": _fuzz_dl_info}
#: Outcome counts of the last run per reader (reported by the test, for docs/robustness.md).
OUTCOMES = {}


def _fuzz(reader: str, n: int, tmp_path_factory):
    fn = READERS[reader]
    counts = OUTCOMES.setdefault((reader, n), {"loaded": 0, "error": 0})

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def prop(data):
        tmp = tmp_path_factory.mktemp(reader, numbered=True)
        try:
            counts[fn(tmp, data)] += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    prop()
    print(f"fuzz {reader}: {n} examples requested, {counts}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzz_reader(reader, tmp_path_factory):
    _fuzz(reader, FUZZ_EXAMPLES, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("reader", sorted(READERS))
def test_fuzz_reader_large(reader, tmp_path_factory):
    _fuzz(reader, FUZZ_EXAMPLES_SLOW, tmp_path_factory)
