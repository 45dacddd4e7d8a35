"""Tests for mdkd_det.modeling.fusion.ops (paper C11, A5)."""

import pytest
import torch
from torch import nn

from mdkd_det.modeling.fusion.ops import (FUSION_REGISTRY, Concat1x1Fusion, CrossAttentionFusion,
                                          attention_heads, build_fusion_op, group_norm)
from mdkd_det.utils.errors import RegistryError


def _maps(b=2, chans=(8, 8, 8), hw=(6, 6)):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, c, *hw, generator=g) for c in chans]


def test_registry_has_builtins():
    assert {"concat1x1", "cross_attention"} <= set(FUSION_REGISTRY.names())
    with pytest.raises(RegistryError, match="concat1x1"):
        build_fusion_op("nope", [8], 8)


def test_group_norm_groups():
    assert group_norm(256).num_groups == 32
    assert group_norm(64).num_groups == 32
    assert group_norm(16).num_groups == 8  # >= 2 channels per group
    assert group_norm(24).num_groups == 8
    assert group_norm(7).num_groups == 1
    assert group_norm(2).num_groups == 1
    group_norm(8)(torch.randn(1, 8, 1, 1))  # a 1x1 map is valid


@pytest.mark.parametrize("name", ["concat1x1", "cross_attention"])
def test_shapes_and_grad(name):
    op = build_fusion_op(name, [8, 16, 4], 16)
    maps = _maps(chans=(8, 16, 4))
    for m in maps:
        m.requires_grad_(True)
    out = op(maps)
    assert out.shape == (2, 16, 6, 6)
    out.sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)
    assert all(p.grad is not None for p in op.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["concat1x1", "cross_attention"])
def test_resizes_to_first_map(name):
    op = build_fusion_op(name, [8, 8], 8)
    out = op([torch.randn(1, 8, 5, 7), torch.randn(1, 8, 10, 14)])
    assert out.shape == (1, 8, 5, 7)


def test_concat1x1_matches_manual_formula():
    op = Concat1x1Fusion([3, 2], 4, max_groups=2)
    maps = _maps(b=1, chans=(3, 2), hw=(3, 3))
    ref = torch.relu(nn.functional.group_norm(
        nn.functional.conv2d(torch.cat(maps, 1), op.conv.weight), 2, op.norm.weight, op.norm.bias))
    assert torch.allclose(op(maps), ref, atol=1e-6)
    assert op.conv.in_channels == 5 and op.norm.num_groups == 2


def test_wrong_maps_raise():
    op = build_fusion_op("concat1x1", [8, 8], 8)
    with pytest.raises(ValueError, match="built for 2 maps"):
        op(_maps(chans=(8,)))
    with pytest.raises(ValueError, match="map 1"):
        op(_maps(chans=(8, 4)))
    with pytest.raises(ValueError, match="in_channels"):
        build_fusion_op("concat1x1", [], 8)


def test_attention_heads():
    assert attention_heads(256) == 4
    assert attention_heads(1024) == 8
    assert attention_heads(16) == 1
    assert attention_heads(192) == 3
    op = CrossAttentionFusion([128, 128, 64], 32)
    assert op.attns[0].num_heads == 2 and op.attns[1].kdim == 64
    assert len(op.blocks) == 2


def test_cross_attention_pools_tokens_to_token_size():
    op = CrossAttentionFusion([8, 8], 8, token_size=4)
    seen = {}
    op.attns[0].register_forward_hook(lambda m, a, o: seen.update(q=a[0].shape))
    out = op(_maps(b=1, chans=(8, 8), hw=(12, 10)))
    assert seen["q"] == (1, 16, 8)  # 4x4 tokens, C = 8
    assert out.shape == (1, 8, 12, 10)


def test_cross_attention_single_map_and_source_influence():
    op = CrossAttentionFusion([8], 8)
    assert op(_maps(b=1, chans=(8,))).shape == (1, 8, 6, 6)
    op = CrossAttentionFusion([8, 8], 8).eval()
    f0, f1 = _maps(b=1, chans=(8, 8))
    a = op([f0, f1])
    b = op([f0, f1 * 3 + 1])
    assert not torch.allclose(a, b)  # the source map reaches the output through attention
