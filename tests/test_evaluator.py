"""Tests of mdkd_det.evaluation.evaluator (inference loop, metrics table)."""

import math

import torch

from mdkd_det.evaluation.evaluator import inference_on_dataset, print_metrics_table


class _FakeDetector(torch.nn.Module):
    """Returns one box per image whose score is the image mean; records the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen_modes, self.grad_enabled = [], []

    def forward(self, images):
        self.seen_modes.append(self.training)
        self.grad_enabled.append(torch.is_grad_enabled())
        return [{"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "scores": im.mean().reshape(1) * self.w,
                 "labels": torch.tensor([1])} for im in images]


class _RecordingEvaluator:
    def __init__(self):
        self.calls, self.was_reset = [], False

    def reset(self):
        self.was_reset = True

    def process(self, inputs, outputs):
        self.calls.append(([r["image_id"] for r in inputs], [float(o["scores"][0]) for o in outputs]))

    def evaluate(self):
        return {"n": sum(len(c[0]) for c in self.calls)}


def test_inference_loop_modes_and_calls():
    model = _FakeDetector().train()
    batches = [
        [{"image": torch.full((1, 8, 8), 0.25 * (2 * b + i)), "target": {}, "record": {"image_id": 2 * b + i}}
         for i in range(2)]
        for b in range(2)
    ]
    ev = _RecordingEvaluator()
    assert inference_on_dataset(model, batches, ev) == {"n": 4}
    assert ev.was_reset and [c[0] for c in ev.calls] == [[0, 1], [2, 3]]
    assert ev.calls[1][1] == [0.5, 0.75]
    assert model.seen_modes == [False, False] and model.grad_enabled == [False, False]
    assert model.training  # restored


def test_metrics_table():
    res = {"bbox": {"AP": 41.234, "AP50": 80.0, "AP75": 30.0, "APs": 40.0, "APm": math.nan, "APl": math.nan,
                    "AR100": 55.5}, "froc": {"CPM": 0.71234}}
    t = print_metrics_table(res)
    lines = t.splitlines()
    assert lines[0].split("|")[1].strip() == "AP" and "CPM" in lines[0]
    assert "41.23" in lines[2] and "0.7123" in lines[2] and "nan" in lines[2]
    multi = print_metrics_table({"lungct": res, "deeplesion": {"bbox": {"AP": 1.0}}})
    assert len(multi.splitlines()) == 4 and "deeplesion" in multi and "-" in multi.splitlines()[3]
