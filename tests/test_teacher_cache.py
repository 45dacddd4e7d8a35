"""FROZEN_TEACHER.CACHE_DIR: disk cache of frozen teachers' per-image maps (issue 11, D11.2)."""

import json
import logging
import os

import pytest
import torch

from mdkd_det.modeling.frozen_teacher import TeacherRuntime, freeze_teacher
from mdkd_det.modeling.teacher_cache import CachedBackbone, uncached

from _tiny import tiny_cfg, tiny_kd_cfg


def _backbone(seed=0):
    from mdkd_det.engine.defaults import build_model

    torch.manual_seed(seed)
    return freeze_teacher(build_model(tiny_cfg("/tmp/unused")).backbone)


def _x(n=3, seed=1):
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_hit_equals_miss_bitwise_and_each_image_is_computed_alone(tmp_path):
    bb = _backbone()
    x = _x()
    with torch.inference_mode():
        alone = [bb(x[i:i + 1]) for i in range(3)]
        batched = bb(x)
        cold = CachedBackbone(bb, str(tmp_path), 10**9)
        out_cold = cold(x)
        assert (cold.hits, cold.misses) == (0, 3)
        warm = CachedBackbone(bb, str(tmp_path), 10**9)  # a new process would see the same files
        out_warm = warm(x)
        assert (warm.hits, warm.misses) == (0 + 3, 0)
    assert _equal(out_cold, out_warm)
    for k in batched:
        for i in range(3):
            assert torch.equal(out_cold[k][i], alone[i][k][0])
        torch.testing.assert_close(out_cold[k], batched[k], rtol=0, atol=1e-5)
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 3 and all(f.endswith(".pt") for f in files)
    # attributes of the backbone pass through the wrapper
    assert cold.output_shape() == bb.output_shape() and uncached(cold) is bb


def test_new_weights_or_input_never_read_old_entries(tmp_path):
    x = _x(2)
    with torch.inference_mode():
        a = CachedBackbone(_backbone(0), str(tmp_path), 10**9)
        out_a = a(x)
        b = CachedBackbone(_backbone(1), str(tmp_path), 10**9)  # retrained teacher
        out_b = b(x)
        assert b.misses == 2 and b.cache.dir != a.cache.dir and not _equal(out_a, out_b)
        flipped = a(torch.flip(x, dims=[3]))  # the other augmentation of the same images
    assert a.misses == 4 and a.hits == 0
    assert all(flipped[k].shape == out_b[k].shape for k in out_b)


def test_damaged_entry_is_recomputed_and_size_limit_stops_writing(tmp_path, caplog):
    bb = _backbone()
    x = _x(2)
    with torch.inference_mode():
        ref = CachedBackbone(bb, str(tmp_path / "a"), 10**9)
        want = ref(x)
        for dirpath, _, fs in os.walk(tmp_path / "a"):
            for f in fs:
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(b"not a tensor file")
        again = CachedBackbone(bb, str(tmp_path / "a"), 10**9)
        with caplog.at_level(logging.WARNING, logger="mdkd_det.modeling.teacher_cache"):
            got = again(x)
        assert again.misses == 2 and "unreadable entry" in caplog.text and _equal(got, want)
        assert CachedBackbone(bb, str(tmp_path / "a"), 10**9)(x) is not None  # rewritten: hits now
        small = CachedBackbone(bb, str(tmp_path / "b"), 1000)  # smaller than one entry
        with caplog.at_level(logging.WARNING, logger="mdkd_det.modeling.teacher_cache"):
            got_small = small(x)
        assert "full" in caplog.text and _equal(got_small, want)
        assert not any(fs for _, _, fs in os.walk(tmp_path / "b"))


def test_fusion_backbone_caches_each_teacher(tmp_path):
    from mdkd_det.modeling.fusion import FusionBackbone

    teachers = [_backbone(0), _backbone(1)]
    x = _x(2)
    rt = TeacherRuntime(inference_mode=True, cache_dir=str(tmp_path))
    fb = FusionBackbone(teachers, out_channels=16, runtime=rt).eval()
    plain = FusionBackbone(teachers, out_channels=16, runtime=TeacherRuntime(inference_mode=True)).eval()
    plain.load_state_dict(fb.state_dict())
    with torch.no_grad():
        first, second, ref = fb(x), fb(x), plain(x)
    assert all(isinstance(t, CachedBackbone) for t in fb.prepared_teachers())
    assert [(t.hits, t.misses) for t in fb.prepared_teachers()] == [(2, 2), (2, 2)]
    assert _equal(first, second)
    for k in ref:
        torch.testing.assert_close(first[k], ref[k], rtol=1e-4, atol=1e-4)  # fp32 rounding
    assert TeacherRuntime().cached(teachers[0]) is teachers[0]  # off: unchanged


def test_kd_run_with_a_warm_cache_equals_the_cold_run_bitwise(tmp_path, data_root):
    """Hits and misses give the same maps, so a rerun (or a resumed run) reading a warm cache
    trains bit-identical weights; the second run's teacher lookups are all hits."""
    from mdkd_det.distill.trainer import KDTrainer

    cache = str(tmp_path / "cache")
    weights = []
    cold = tiny_kd_cfg(tmp_path, max_iter=3, **{"FROZEN_TEACHER.CACHE_DIR": cache})
    for run in ("cold", "warm"):
        cfg = cold.clone()  # the same teacher
        cfg.OUTPUT_DIR = str(tmp_path / run)
        trainer = KDTrainer(cfg)
        cached = trainer.teacher.backbone
        assert isinstance(cached, CachedBackbone)
        trainer.resume_or_load(resume=False)
        trainer.train()
        hits, misses = cached.hits, cached.misses
        if run == "cold":
            assert misses > 0
        else:
            assert misses == 0 and hits == 3 * int(cfg.SOLVER.IMS_PER_BATCH)
        weights.append(torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=True)["model"])
        rows = [json.loads(r) for r in open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))]
        assert any("loss_FAlgn" in r for r in rows)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cache_max_gb_must_be_positive(tmp_path):
    from mdkd_det.config.validate import validate_config
    from mdkd_det.utils.errors import ConfigError

    cfg = tiny_cfg(tmp_path, **{"FROZEN_TEACHER.CACHE_MAX_GB": 0.0})
    with pytest.raises(ConfigError, match="FROZEN_TEACHER.CACHE_MAX_GB"):
        validate_config(cfg)
