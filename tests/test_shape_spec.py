"""One stride-matching helper (issue 14): exact KD pairs (A25), nearest-stride fusion pairs and
detectron2's FPN level names."""

import pytest

from mdkd_det.modeling.shape_spec import ShapeSpec, level_name, match_levels_by_stride


def _shapes(**strides):
    return {k: ShapeSpec(8, stride=s) for k, s in strides.items()}


def test_exact_pairs_each_teacher_level_once_first_of_a_stride_wins():
    s = _shapes(a=4, b=8, c=8, d=32)
    t = _shapes(p2=4, x=8, y=8, p4=16)
    assert match_levels_by_stride(s, t) == {"a": "p2", "b": "x"}
    with pytest.raises(ValueError, match="share no stride"):
        match_levels_by_stride(_shapes(a=2), _shapes(b=3))


def test_nearest_log2_ties_to_the_finer_map_and_may_share():
    ref = _shapes(p2=4, p3=8, p6=64)
    seg = _shapes(s1=1, s2=2, s4=4, s16=16)
    assert match_levels_by_stride(ref, seg, nearest=True) == {"p2": "s4", "p3": "s4", "p6": "s16"}
    # stride 8 is as far (in log2) from 4 as from 16: the finer map wins
    assert match_levels_by_stride(_shapes(a=8), _shapes(b=16, c=4), nearest=True) == {"a": "c"}


def test_deprecated_alias_and_level_names():
    from mdkd_det.modeling.fusion.fusion_backbone import match_levels_nearest_stride

    with pytest.warns(DeprecationWarning):
        assert match_levels_nearest_stride(_shapes(a=8), _shapes(b=16, c=4)) == {"a": "c"}
    assert [level_name(s) for s in (4, 8, 64)] == ["p2", "p3", "p6"]
    for bad in (0, 3, 12):
        with pytest.raises(ValueError, match="power of two"):
            level_name(bad)
