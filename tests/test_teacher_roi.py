"""``teacher_roi_outputs``: one teacher RoI-head forward for torchvision and detectron2 heads
(issue 14). detectron2 is not needed: its ``StandardROIHeads`` is faked by duck typing."""

import torch
from torch import nn

from mdkd_det.distill.taps import teacher_roi_outputs


class _Boxes:
    def __init__(self, t):
        self.tensor = t


class _Instances:
    def __init__(self, t):
        self.proposal_boxes = _Boxes(t)


class _D2Predictor(nn.Module):
    """detectron2 ``FastRCNNOutputLayers``: (scores [M, K+1], deltas [M, 4K])."""

    def __init__(self, d, k):
        super().__init__()
        self.cls_score, self.bbox_pred = nn.Linear(d, k + 1), nn.Linear(d, 4 * k)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class _D2Heads(nn.Module):
    """detectron2 ``StandardROIHeads``: ``box_pooler(list of maps, list[Boxes])``."""

    box_in_features = ["p3", "p2"]

    def __init__(self):
        super().__init__()
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4, 6))
        self.box_predictor = _D2Predictor(6, 2)

    def box_pooler(self, feats, boxes):
        # one row per box: the mean of each map, times the box's x0 (a stand-in for ROIAlign)
        rows = [torch.stack([f[i].mean(dim=(1, 2)) * b.tensor[j, 0] for f in feats])
                for i, bx in enumerate(boxes) for b in [bx] for j in range(b.tensor.shape[0])]
        return torch.stack(rows)  # [sum M_i, len(feats), C]


def test_detectron2_heads_pool_their_in_features_and_score_like_the_predictor():
    torch.manual_seed(0)
    heads = _D2Heads()
    model = nn.Module()
    model.roi_heads = heads
    feats = {"p2": torch.randn(2, 4, 8, 8), "p3": torch.randn(2, 4, 4, 4)}
    props = [_Instances(torch.rand(3, 4)), _Instances(torch.rand(2, 4))]
    emb, scores = teacher_roi_outputs(model, feats, props)
    # the former d2_teacher_roi_outputs, written out
    ref_emb = heads.box_head(heads.box_pooler([feats[f] for f in heads.box_in_features],
                                              [p.proposal_boxes for p in props]))
    ref_scores, _ = heads.box_predictor(ref_emb)
    assert torch.equal(emb, ref_emb) and torch.equal(scores, ref_scores)
    assert emb.shape == (5, 6) and scores.shape == (5, 3) and not scores.requires_grad
