"""Mapper, samplers and loaders on real LungCT records: determinism, resumability, negatives."""

import torch

from mdkd_det.config import get_cfg
from mdkd_det.data.build import build_detection_test_loader, build_detection_train_loader, get_dataset_records
from mdkd_det.data.mapper import DatasetMapper
from mdkd_det.data.samplers import GroupedBatchSampler, InferenceSampler, TrainingSampler


def _cfg(**kw):
    cfg = get_cfg()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATASETS.TRAIN_LIMIT = 12
    cfg.INPUT.AUG.AFFINE_PROB = 0.5
    cfg.INPUT.AUG.BRIGHTNESS_CONTRAST_PROB = 0.5
    for k, v in kw.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_training_sampler_resume_and_shards():
    s = TrainingSampler(5, seed=3)
    stream = [x for _, x in zip(range(23), s)]
    assert [p for _, p in stream] == list(range(23))
    for e in range(4):  # each epoch is a permutation
        idx = [i for i, p in stream if e * 5 <= p < e * 5 + 5]
        assert sorted(idx) == list(range(5)) or len(idx) < 5
    resumed = [x for _, x in zip(range(10), TrainingSampler(5, seed=3, start=13))]
    assert resumed == stream[13:23]
    r0 = [x for _, x in zip(range(6), TrainingSampler(5, seed=3, rank=0, world_size=2))]
    r1 = [x for _, x in zip(range(6), TrainingSampler(5, seed=3, rank=1, world_size=2))]
    assert [p for _, p in r0] == [0, 2, 4, 6, 8, 10] and [p for _, p in r1] == [1, 3, 5, 7, 9, 11]
    assert r0 == stream[0:12:2] and r1 == stream[1:12:2]


def test_grouped_batches_and_inference_shards():
    items = [(i % 4, i) for i in range(12)]
    batches = list(GroupedBatchSampler(items, group_ids=[0, 1, 0, 1], batch_size=2))
    for b in batches:
        assert len({i % 2 for i, _ in b}) == 1
    assert list(InferenceSampler(5, 0, 2)) == [0, 1, 2] and list(InferenceSampler(5, 1, 2)) == [3, 4]


def test_mapper_output_and_seeded_augmentation(data_root):
    cfg = _cfg()
    rec = get_dataset_records(cfg, ["lungct_train"])[0]
    m = DatasetMapper(cfg, is_train=True)
    a, b = m(rec, seed=5), m(rec, seed=5)
    assert a["image"].shape == (3, rec["height"], rec["width"]) and a["image"].dtype == torch.float32
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"]["boxes"], b["target"]["boxes"])
    assert a["target"]["labels"].tolist() == [1]  # contiguous 0 -> torchvision label 1
    c = DatasetMapper(cfg, is_train=False)(rec)
    assert torch.equal(c["target"]["boxes"], torch.tensor([a_["bbox"] for a_ in rec["annotations"]]))


def test_negative_image_kept(data_root):
    cfg = _cfg()
    rec = dict(get_dataset_records(cfg, ["lungct_train"])[0], annotations=[])
    out = DatasetMapper(cfg, is_train=True)(rec, seed=1)
    assert out["target"]["boxes"].shape == (0, 4) and out["target"]["labels"].shape == (0,)


def test_train_loader_resumes_exactly(data_root):
    cfg = _cfg()
    full = build_detection_train_loader(cfg, start_iter=0)
    it = iter(full)
    batches = [next(it) for _ in range(5)]
    resumed = next(iter(build_detection_train_loader(cfg, start_iter=3)))
    for x, y in zip(batches[3], resumed):
        assert x["record"]["file_name"] == y["record"]["file_name"]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["target"]["boxes"], y["target"]["boxes"])


def test_loader_with_workers_matches_in_process(data_root):
    cfg0, cfg2 = _cfg(), _cfg(**{"DATALOADER.NUM_WORKERS": 2})
    a = next(iter(build_detection_train_loader(cfg0)))
    b = next(iter(build_detection_train_loader(cfg2)))
    assert [d["record"]["image_id"] for d in a] == [d["record"]["image_id"] for d in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_test_loader_in_order(data_root):
    cfg = _cfg(**{"DATASETS.TEST_LIMIT": 5})
    loader = build_detection_test_loader(cfg, "lungct_valid")
    ids = [d["record"]["image_id"] for batch in loader for d in batch]
    recs = get_dataset_records(cfg, ["lungct_valid"], 5)
    assert ids == [r["image_id"] for r in recs]
