"""Tests of mdkd_det.evaluation.visualize (OpenCV drawing, PNG output)."""

import cv2
import numpy as np
import pytest
import torch

from mdkd_det.evaluation.visualize import draw_detections, save_visualizations


def test_draw_colours_and_threshold():
    img = np.full((40, 60), 0.5, dtype=np.float32)  # non-square: catches H/W swaps
    out = draw_detections(img, gt_boxes=[[5, 5, 20, 20]], det_boxes=[[30, 10, 50, 30], [2, 30, 12, 38]],
                          det_scores=[0.9, 0.1], score_thresh=0.3)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert tuple(out[5, 12]) == (0, 255, 0)  # GT top edge: green (RGB)
    assert tuple(out[20, 30]) == (255, 0, 0)  # prediction left edge: red
    assert tuple(out[38, 7]) == (128, 128, 128)  # below-threshold prediction not drawn
    assert tuple(out[39, 59]) == (128, 128, 128)  # background keeps the grey value


def test_draw_rejects_colour_image():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        draw_detections(np.zeros((8, 8, 3)))


def test_save_visualizations_sizes(tmp_path):
    records = [
        {"image_id": i, "height": 48 + i, "width": 64, "file_name": f"{i}.png",
         "annotations": [{"bbox": [4, 4, 20, 20], "category_id": 0}]}
        for i in range(3)
    ]
    outputs = [{"boxes": torch.tensor([[6.0, 6.0, 22.0, 22.0]]), "scores": torch.tensor([0.8]),
                "labels": torch.tensor([1])} for _ in records]

    def read_fn(rec):
        return np.random.default_rng(rec["image_id"]).random((rec["height"], rec["width"]))

    paths = save_visualizations(records, outputs, read_fn, str(tmp_path / "vis"), num=2)
    assert len(paths) == 2
    for p, rec in zip(paths, records):
        im = cv2.imread(p)
        assert im is not None and im.shape == (rec["height"], rec["width"], 3)
        assert tuple(im[4, 10]) == (0, 255, 0)  # BGR on disk: green GT edge
        assert tuple(im[6, 14]) == (0, 0, 255)  # red prediction edge
