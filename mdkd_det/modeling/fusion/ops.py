"""Per-level fusion operators of the Stage-2 joint teacher (paper §3.2; paper_notes C11, A5).

Every operator fuses the m+1 teacher maps of ONE pyramid level into one map:

    op = FUSION_REGISTRY.get(name)(in_channels: list[int], out_channels: int, **kw)
    op(maps: list[Tensor[B, C_k, H_k, W_k]]) -> Tensor[B, out_channels, H_0, W_0]

The first map (index 0) is the target teacher T^t; maps whose (H, W) differ from the first are
resized to it (bilinear). Built-ins:

- ``"concat1x1"``: the paper's detection fusion, ``Act(Norm(Conv1x1(concat_k F_k)))`` (C11),
  with GroupNorm + ReLU (the [proposal] of C11; the paper gives no norm/activation).
- ``"concat1x1_residual"``: the same concat -> 1x1 conv -> norm in residual, identity-at-init
  form, ``F*_l = F^t_l + GN(Conv1x1(concat_k F^k_l))`` with the GroupNorm's affine weight and
  bias zero-initialised and no output activation (issue 10; decision in docs/decisions.md beside
  A5/C11): at step 0 the joint teacher's features *are* the target teacher's.
- ``"cross_attention"``: the segmentation fusion of C9 as decided in A5 (query = target
  teacher, keys/values = each source teacher, residual, concat, Conv1x1, 2 residual blocks);
  for detection it is an ablation only.

Third-party operators register with ``@FUSION_REGISTRY.register("name")`` or through the
entry-point group ``mdkd_det.fusion_ops`` (see :mod:`mdkd_det.modeling.registry`).
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

FUSION_REGISTRY = Registry("FUSION", entry_point_group="mdkd_det.fusion_ops")
FUSION_REGISTRY.__doc__ = """Per-level fusion operators: ``op(in_channels: list[int], out_channels: int,
**kw) -> nn.Module`` with ``forward(maps: list[Tensor[B, C_k, H, W]]) -> Tensor[B, out_channels,
H, W]`` (first map = target teacher; others resized to its H, W)."""


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """``GroupNorm`` with ``gcd(max_groups, channels)`` groups (32 for 256 channels), halved
    until every group has at least 2 channels, so any channel count is valid and a 1x1 map
    (the FPN 'pool' level of a 64 px input) still has more than one value per group (torch
    raises otherwise).

    Source: ``torch.nn.GroupNorm``; 32 groups follows Wu & He (2018) and paper_notes C11.
    """
    groups = math.gcd(max_groups, channels)
    while groups > 1 and channels // groups < 2:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _check_in_channels(in_channels: Sequence[int], out_channels: int, op: str) -> List[int]:
    in_channels = [int(c) for c in in_channels]
    if not in_channels or any(c <= 0 for c in in_channels):
        raise ValueError(f"fusion op '{op}': in_channels must be a non-empty list of positive "
                         f"ints, got {in_channels}")
    if int(out_channels) <= 0:
        raise ValueError(f"fusion op '{op}': out_channels must be positive, got {out_channels}")
    return in_channels


def align_maps(maps: Sequence[torch.Tensor], in_channels: Sequence[int], op: str) -> List[torch.Tensor]:
    """Check ``maps`` against ``in_channels`` and resize every map to the first map's (H, W).

    Args:
        maps: ``[Tensor[B, C_k, H_k, W_k]]``, one per teacher, target teacher first.
        in_channels: expected ``C_k``.
        op: operator name for error messages.

    Returns:
        ``[Tensor[B, C_k, H_0, W_0]]`` (bilinear, ``align_corners=False``, torch ``interpolate``).

    Raises:
        ValueError: wrong number of maps, wrong channels, or differing batch sizes.
    """
    if len(maps) != len(in_channels):
        raise ValueError(f"fusion op '{op}' was built for {len(in_channels)} maps, got {len(maps)}")
    h, w = maps[0].shape[-2:]
    out = []
    for k, (m, c) in enumerate(zip(maps, in_channels)):
        if m.dim() != 4 or m.shape[1] != c or m.shape[0] != maps[0].shape[0]:
            raise ValueError(
                f"fusion op '{op}': map {k} has shape {tuple(m.shape)}, expected "
                f"[{maps[0].shape[0]}, {c}, H, W]"
            )
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.append(m)
    return out


@FUSION_REGISTRY.register("concat1x1")
class Concat1x1Fusion(nn.Module):
    """Concat along channels -> Conv1x1 -> GroupNorm -> ReLU (paper §3.2, paper_notes C11).

    ``F*_s = ReLU(GN(Conv1x1(concat_k F_k,s)))``.

    Args:
        in_channels: ``C_k`` of each teacher map, target teacher first.
        out_channels: channels of the fused map (paper: "a fixed number of channels"; 256).
        max_groups: upper bound on GroupNorm groups (``gcd(max_groups, out_channels)`` used).

    Shapes:
        forward(maps: list[Tensor[B, C_k, H_k, W_k]]) -> Tensor[B, out_channels, H_0, W_0].

    Raises:
        ValueError: bad channel lists (init) or maps not matching them (forward).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, max_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = _check_in_channels(in_channels, out_channels, "concat1x1")
        self.out_channels = int(out_channels)
        self.conv = nn.Conv2d(sum(self.in_channels), self.out_channels, 1, bias=False)
        self.norm = group_norm(self.out_channels, max_groups)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = align_maps(maps, self.in_channels, "concat1x1")
        return self.act(self.norm(self.conv(torch.cat(maps, dim=1))))


@FUSION_REGISTRY.register("concat1x1_residual")
class ResidualConcat1x1Fusion(nn.Module):
    """Concat -> Conv1x1 -> GroupNorm added onto the target teacher's map (issue 10).

    ``F*_l = F^t_l + GN(Conv1x1(concat_k F^k_l))`` — the paper's "concat -> 1x1 -> norm"
    (§3.2, C11) as a residual branch. The GroupNorm's affine weight and bias start at zero
    (the zero-init-residual trick of Goyal et al. 2017, "Accurate, Large Minibatch SGD", §5.1),
    so the branch is exactly 0 and ``F*_l = F^t_l`` at initialisation: a joint teacher whose heads
    start from the target teacher's (``PIPELINE.JOINT_TEACHER_HEAD_INIT target_teacher``) gives
    the target teacher's detections at iteration 0. No activation is applied to the output:
    FPN maps are linear (signed), and a ReLU would clip them.

    Args:
        in_channels: ``C_k`` of each teacher map, target teacher first.
        out_channels: channels of the fused map; must equal ``in_channels[0]`` (the target
            teacher's width; ``FUSION.OUT_CHANNELS`` 0 gives exactly that).
        max_groups: upper bound on GroupNorm groups.

    Shapes:
        forward(maps: list[Tensor[B, C_k, H_k, W_k]]) -> Tensor[B, C_0, H_0, W_0].

    Raises:
        ValueError: ``out_channels != in_channels[0]``, bad channel lists (init) or maps not
            matching them (forward).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, max_groups: int = 32) -> None:
        super().__init__()
        self.in_channels = _check_in_channels(in_channels, out_channels, "concat1x1_residual")
        if int(out_channels) != self.in_channels[0]:
            raise ValueError(
                f"fusion op 'concat1x1_residual' adds onto the target teacher's map, so its "
                f"out_channels must equal the target teacher's {self.in_channels[0]} channels, "
                f"got {out_channels} (set FUSION.OUT_CHANNELS to {self.in_channels[0]} or 0)")
        self.out_channels = int(out_channels)
        self.conv = nn.Conv2d(sum(self.in_channels), self.out_channels, 1, bias=False)
        self.norm = group_norm(self.out_channels, max_groups)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = align_maps(maps, self.in_channels, "concat1x1_residual")
        return maps[0] + self.norm(self.conv(torch.cat(maps, dim=1)))


class ResidualConvBlock(nn.Module):
    """Basic residual block ``ReLU(x + GN(Conv3x3(ReLU(GN(Conv3x3(x))))))`` (ResNet BasicBlock
    with GroupNorm; the "convolutional residual blocks" of paper §3.2 / C9).

    Shapes: ``Tensor[B, C, H, W] -> Tensor[B, C, H, W]``.
    """

    def __init__(self, channels: int, max_groups: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = group_norm(channels, max_groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(channels, max_groups)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        return F.relu(x + self.norm2(self.conv2(y)))


def attention_heads(channels: int, max_heads: int = 8, head_dim: int = 64) -> int:
    """Heads for ``channels``: ``max(1, channels // head_dim)`` capped at ``max_heads``, lowered
    until it divides ``channels`` (``nn.MultiheadAttention`` needs ``embed_dim % heads == 0``).
    paper_notes A5 ("8 heads (or C/64)")."""
    h = max(1, min(max_heads, channels // head_dim))
    while channels % h:
        h -= 1
    return h


@FUSION_REGISTRY.register("cross_attention")
class CrossAttentionFusion(nn.Module):
    """Cross-attention fusion (paper C9, decision A5).

    With ``F_0`` the target-teacher map (query) and ``F_1..F_m`` the source-teacher maps:

    1. tokens: every map is average-pooled to at most ``token_size`` x ``token_size``
       (``adaptive_avg_pool2d``; untouched when already smaller);
    2. ``O_k = MHA(Q=LN(F_0), K=V=LN(F_k))`` (``nn.MultiheadAttention``, ``kdim=vdim=C_k``,
       heads from :func:`attention_heads`);
    3. ``A_k = F_0 + Upsample(O_k)``: the residual is added onto the full-resolution query
       after bilinear upsampling of the attention output back to (H, W), so no detail of
       ``F_0`` is lost to the token pooling (A5 leaves the order of residual and upsampling
       open);
    4. ``out = ResBlock x num_blocks(ReLU(GN(Conv1x1(concat[F_0, A_1..A_m]))))``.

    With a single map (m = 0) only step 4 runs on ``[F_0]``.

    Args:
        in_channels: ``C_k`` per teacher, target teacher first.
        out_channels: channels of the fused map.
        token_size: max token grid side (A5: 32, i.e. at most 1024 tokens).
        num_blocks: residual blocks after the projection (A5: 2).
        max_heads: head cap (A5: 8).
        dropout: attention dropout.

    Shapes:
        forward(maps: list[Tensor[B, C_k, H_k, W_k]]) -> Tensor[B, out_channels, H_0, W_0].

    Raises:
        ValueError: bad channel lists (init) or maps not matching them (forward).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, token_size: int = 32,
                 num_blocks: int = 2, max_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels = _check_in_channels(in_channels, out_channels, "cross_attention")
        self.out_channels = int(out_channels)
        self.token_size = int(token_size)
        c0 = self.in_channels[0]
        heads = attention_heads(c0, max_heads)
        self.query_norms = nn.ModuleList(nn.LayerNorm(c0) for _ in self.in_channels[1:])
        self.key_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.in_channels[1:])
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(c0, heads, dropout=dropout, kdim=c, vdim=c, batch_first=True)
            for c in self.in_channels[1:]
        )
        self.proj = nn.Conv2d(c0 * len(self.in_channels), self.out_channels, 1, bias=False)
        self.proj_norm = group_norm(self.out_channels)
        self.blocks = nn.Sequential(*(ResidualConvBlock(self.out_channels) for _ in range(num_blocks)))
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, h*w, C]`` with ``h, w <= token_size`` (average pooling)."""
        h, w = x.shape[-2:]
        size = (min(h, self.token_size), min(w, self.token_size))
        if size != (h, w):
            x = F.adaptive_avg_pool2d(x, size)
        return x.flatten(2).transpose(1, 2)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        maps = align_maps(maps, self.in_channels, "cross_attention")
        f0 = maps[0]
        h, w = f0.shape[-2:]
        q_tokens = self._tokens(f0)
        th, tw = min(h, self.token_size), min(w, self.token_size)
        fused = [f0]
        for fk, qn, kn, attn in zip(maps[1:], self.query_norms, self.key_norms, self.attns):
            kv = kn(self._tokens(fk))
            o, _ = attn(qn(q_tokens), kv, kv, need_weights=False)  # [B, th*tw, C_0]
            o = o.transpose(1, 2).reshape(f0.shape[0], f0.shape[1], th, tw)
            if (th, tw) != (h, w):
                o = F.interpolate(o, size=(h, w), mode="bilinear", align_corners=False)
            fused.append(f0 + o)
        x = F.relu(self.proj_norm(self.proj(torch.cat(fused, dim=1))), inplace=True)
        return self.blocks(x)


def build_fusion_op(name: str, in_channels: Sequence[int], out_channels: int, **kw) -> nn.Module:
    """Build fusion operator ``name`` from :data:`FUSION_REGISTRY`.

    Args:
        name: registered name ("concat1x1", "cross_attention", or a plugin).
        in_channels: channels of each teacher map at this level, target teacher first.
        out_channels: channels of the fused map.
        **kw: operator-specific options (e.g. ``token_size`` for cross_attention).

    Raises:
        RegistryError: unknown name (the message lists registered names).
        ValueError / TypeError: from the operator for bad channels or options.
    """
    return FUSION_REGISTRY.get(name)(list(in_channels), int(out_channels), **kw)
