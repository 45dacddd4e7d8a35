"""FROZEN_TEACHER.CACHE_DIR: disk cache of frozen teachers' per-image maps (issue 11, D11.2)."""

import json
import logging
import os

import pytest
import torch

from mdkd_det.modeling.frozen_teacher import TeacherRuntime, freeze_teacher
from mdkd_det.modeling.teacher_cache import CachedBackbone, uncached

from _tiny import crashing_kd_trainer, tiny_cfg, tiny_kd_cfg


def _backbone(seed=0):
    from mdkd_det.engine.defaults import build_model

    torch.manual_seed(seed)
    return freeze_teacher(build_model(tiny_cfg("/tmp/unused")).backbone)


def _x(n=3, seed=1):
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_misses_run_as_one_batch_and_hits_return_what_was_stored(tmp_path):
    bb = _backbone()
    x = _x()
    with torch.inference_mode():
        batched = bb(x)
        cold = CachedBackbone(bb, str(tmp_path), 10**9)
        out_cold = cold(x)
        assert (cold.hits, cold.misses) == (0, 3)
        warm = CachedBackbone(bb, str(tmp_path), 10**9)  # a new process would see the same files
        out_warm = warm(x)
        assert (warm.hits, warm.misses) == (3, 0)
        # a partly cached batch: the two new images run together, the cached one is read
        y = torch.cat([x[1:2], _x(2, seed=5)])
        mixed = warm(y)
        assert (warm.hits, warm.misses) == (4, 2)
        new_pair = bb(y[1:])
    assert _equal(out_cold, batched) and _equal(out_cold, out_warm)  # the batched forward, bitwise
    for k in batched:
        assert torch.equal(mixed[k][0], batched[k][1]) and torch.equal(mixed[k][1:], new_pair[k])
        assert out_cold[k].is_contiguous() and mixed[k].is_contiguous()
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 5 and all(f.endswith(".pt") for f in files)
    one = torch.load(files[0], weights_only=True)  # one image per file, not the batch's storage
    assert all(v.shape[0] == 1 and v.untyped_storage().nbytes() == v.numel() * 4 for v in one.values())
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


def test_resume_with_the_cache_is_bitwise_exact(tmp_path, data_root):
    """A run interrupted after a checkpoint and resumed (the steps after the checkpoint now read
    the maps their first execution stored) ends with the weights of an uninterrupted run; a
    second run on the same teacher reads every map from the cache."""
    from mdkd_det.distill.trainer import KDTrainer
    Crashing = crashing_kd_trainer(3)

    base = tiny_kd_cfg(tmp_path, max_iter=4, **{"SOLVER.CHECKPOINT_PERIOD": 2})

    def cfg(run, cache):
        c = base.clone()  # the same teacher
        c.OUTPUT_DIR, c.FROZEN_TEACHER.CACHE_DIR = str(tmp_path / run), str(tmp_path / cache)
        return c

    def state(trainer):
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    straight = KDTrainer(cfg("straight", "cache_a"))
    straight.resume_or_load(resume=False)
    straight.train()
    assert straight.teacher.backbone.misses > 0
    crash = Crashing(cfg("crash", "cache_b"))
    crash.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crash.train()
    torch.manual_seed(999)  # a new process: other RNG state, restored by the checkpoint
    resumed = KDTrainer(cfg("crash", "cache_b"))
    assert resumed.resume_or_load(resume=True) == 2
    resumed.train()
    cached = resumed.teacher.backbone
    assert isinstance(cached, CachedBackbone) and cached.hits == 2  # step 2 redone: its 2 images read
    a, b = state(straight), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = KDTrainer(cfg("again", "cache_a"))  # the uninterrupted run's data order: all cached
    again.resume_or_load(resume=False)
    again.train()
    assert again.teacher.backbone.misses == 0 and again.teacher.backbone.hits == 8
    rows = [json.loads(r) for r in open(os.path.join(str(tmp_path / "again"), "metrics.json"))]
    assert any("loss_FAlgn" in r for r in rows)
    c = state(again)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cache_max_gb_must_be_positive(tmp_path):
    from mdkd_det.config.validate import validate_config
    from mdkd_det.utils.errors import ConfigError

    cfg = tiny_cfg(tmp_path, **{"FROZEN_TEACHER.CACHE_MAX_GB": 0.0})
    with pytest.raises(ConfigError, match="FROZEN_TEACHER.CACHE_MAX_GB"):
        validate_config(cfg)


def test_joint_kd_teacher_is_cached_once_outside(tmp_path):
    """A joint teacher as the KD teacher: its backbone is cached as a whole, and its
    FusionBackbone no longer caches its own teachers (one entry per image, not N + 1)."""
    from mdkd_det.distill.trainer import build_distiller
    from mdkd_det.engine.defaults import build_model

    over = {"FROZEN_TEACHER.CACHE_DIR": str(tmp_path / "c")}
    jcfg = tiny_cfg(tmp_path / "j", **{"MODEL.BACKBONE.NAME": "fusion", "FUSION.TEACHERS": "()",
                                      "FUSION.TEACHER_BACKBONES": "('resnet18_fpn', 'resnet18_fpn')", **over})
    joint = freeze_teacher(build_model(jcfg))
    assert joint.backbone.runtime.cache_dir  # built with the cache (Stage 2 would use it)
    cfg = tiny_cfg(tmp_path / "s", **over)
    d = build_distiller(cfg, build_model(cfg), joint)
    assert isinstance(joint.backbone, CachedBackbone) and joint.backbone.inner.runtime.cache_dir == ""
    with torch.inference_mode():
        joint.backbone(_x(2))
    files = [f for _, _, fs in os.walk(tmp_path / "c") for f in fs]
    assert len(files) == 2 and d.runtime.cache_dir


def test_uncreatable_cache_dir_is_a_one_line_config_error(tmp_path):
    from mdkd_det.utils.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="FROZEN_TEACHER.CACHE_DIR .*cannot create") as e:
        TeacherRuntime(cache_dir=str(blocker / "cache")).cached(_backbone())
    assert "\n" not in str(e.value)
