"""Tests for mdkd_det.data.multi (paired source/target loader A12, round-robin loader C38)."""

import itertools

import pytest
import torch

from mdkd_det.config import get_cfg
from mdkd_det.data.build import build_detection_train_loader
from mdkd_det.data.multi import (PairedLoader, RoundRobinLoader, build_paired_train_loader,
                                 build_round_robin_train_loader, stream_seed)
from mdkd_det.utils.errors import ConfigError, DatasetError

TARGET, SOURCE = "lungct_train", "lung_pet_ct_dx_train"


def _counter(prefix, start=0):
    def gen():
        for i in itertools.count(start):
            yield f"{prefix}{i}"
    return gen()


def _finite(prefix, n):
    return [f"{prefix}{i}" for i in range(n)]


# ---- pure iterables --------------------------------------------------------------------------
def test_paired_loader_pairs_batches_in_step():
    out = list(itertools.islice(PairedLoader(_counter("s"), _counter("t")), 3))
    assert out == [{"source": "s0", "target": "t0"}, {"source": "s1", "target": "t1"},
                   {"source": "s2", "target": "t2"}]


@pytest.mark.parametrize("short", ["source", "target"])
def test_paired_loader_exhausted_names_domain(short):
    src = _finite("s", 1) if short == "source" else _counter("s")
    tgt = _finite("t", 1) if short == "target" else _counter("t")
    it = iter(PairedLoader(src, tgt))
    next(it)
    with pytest.raises(DatasetError, match=f"{short} loader"):
        next(it)


def test_paired_loader_rejects_non_iterable():
    with pytest.raises(TypeError, match="source_loader"):
        PairedLoader(3, [])


def test_round_robin_one_batch_per_dataset_in_order():
    rr = RoundRobinLoader({"b": _counter("b"), "a": _counter("a", 10), "c": _counter("c", 5)})
    assert rr.names == ["b", "a", "c"]
    out = list(itertools.islice(rr, 2))
    assert [list(o) for o in out] == [["b", "a", "c"]] * 2
    assert out[1] == {"b": "b1", "a": "a11", "c": "c6"}


def test_round_robin_errors():
    with pytest.raises(ValueError):
        RoundRobinLoader({})
    with pytest.raises(TypeError, match="'x'"):
        RoundRobinLoader({"x": 5})
    it = iter(RoundRobinLoader({"a": _counter("a"), "short": _finite("s", 1)}))
    next(it)
    with pytest.raises(DatasetError, match="'short'"):
        next(it)


def test_stream_seed():
    assert stream_seed(7, 0) == 7
    assert len({stream_seed(0, i) for i in range(5)}) == 5


# ---- builders on real data -------------------------------------------------------------------
def _cfg(data_root):
    cfg = get_cfg()
    cfg.DATASETS.ROOT = str(data_root)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATASETS.TRAIN = (TARGET,)
    cfg.DATASETS.TRAIN_LIMIT = 12
    cfg.ADVERSARIAL.SOURCE_IMS_PER_BATCH = 1
    cfg.ADVERSARIAL.TARGET_IMS_PER_BATCH = 2
    cfg.SOLVER.IMS_PER_BATCH = 2
    return cfg


def _files(batch):
    return [d["record"]["file_name"] for d in batch]


def test_paired_builder_sizes_domains_and_resume(data_root):
    cfg = _cfg(data_root)
    steps = list(itertools.islice(build_paired_train_loader(cfg, [SOURCE], start_iter=0), 3))
    for step in steps:
        assert len(step["source"]) == 1 and len(step["target"]) == 2
        assert all("Lung_Dx-" in f for f in _files(step["source"]))
        assert all("lungct_roboflow" in f for f in _files(step["target"]))
        img = step["target"][0]["image"]
        assert img.dtype == torch.float32 and img.shape[0] == 3 and 0 <= img.min() <= img.max() <= 1
    resumed = next(iter(build_paired_train_loader(cfg, [SOURCE], start_iter=2)))
    for dom in ("source", "target"):
        assert _files(resumed[dom]) == _files(steps[2][dom])
        for a, b in zip(resumed[dom], steps[2][dom]):
            assert torch.equal(a["image"], b["image"])  # same seeded augmentation
            assert torch.equal(a["target"]["boxes"], b["target"]["boxes"])


def test_paired_builder_uses_different_seed_per_domain(data_root):
    cfg = _cfg(data_root)
    cfg.ADVERSARIAL.SOURCE_IMS_PER_BATCH = 2
    steps = list(itertools.islice(build_paired_train_loader(cfg, [TARGET], [TARGET]), 3))
    src = [f for s in steps for f in _files(s["source"])]
    tgt = [f for s in steps for f in _files(s["target"])]
    assert src != tgt  # same records and batch size: only the seed differs


def test_paired_builder_config_errors(data_root):
    cfg = _cfg(data_root)
    with pytest.raises(ConfigError, match="ADVERSARIAL.SOURCE"):
        build_paired_train_loader(cfg, [])
    cfg.ADVERSARIAL.TARGET_IMS_PER_BATCH = 0
    with pytest.raises(ConfigError, match="TARGET_IMS_PER_BATCH"):
        build_paired_train_loader(cfg, [SOURCE])


def test_round_robin_builder(data_root):
    cfg = _cfg(data_root)
    rr = build_round_robin_train_loader(cfg, [TARGET, SOURCE], start_iter=0)
    assert rr.names == [TARGET, SOURCE]
    steps = list(itertools.islice(rr, 2))
    for step in steps:
        assert list(step) == [TARGET, SOURCE]
        assert len(step[TARGET]) == 2 and len(step[SOURCE]) == 2
        assert all("Lung_Dx-" in f for f in _files(step[SOURCE]))
    # the target stream is the plain single-dataset stream (seed SEED, same batch size)
    plain = list(itertools.islice(build_detection_train_loader(cfg, [TARGET]), 2))
    assert [_files(s[TARGET]) for s in steps] == [_files(b) for b in plain]
    resumed = next(iter(build_round_robin_train_loader(cfg, [TARGET, SOURCE], start_iter=1)))
    assert {k: _files(v) for k, v in resumed.items()} == {k: _files(v) for k, v in steps[1].items()}
    with pytest.raises(ConfigError, match="more than once"):
        build_round_robin_train_loader(cfg, [TARGET, TARGET])


def test_combined_loaders_leave_global_rng_alone(data_root):
    """iter()/next() must not draw from the global torch RNG (resume exactness)."""
    cfg = _cfg(data_root)
    for loader in (build_paired_train_loader(cfg, [SOURCE]),
                   build_round_robin_train_loader(cfg, [TARGET, SOURCE])):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), state)
