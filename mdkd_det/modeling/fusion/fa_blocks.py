"""Classification fusion: adapters to ``joint_ch`` + ``FA_blocks`` Fusion Attention blocks
(paper §3.2 "classification head", Tables 9/12; paper_notes C10, decision A6).

Registered in ``FUSION_REGISTRY`` as ``"fa_blocks"`` so the joint classification teacher is the
same :class:`~mdkd_det.modeling.fusion.FusionBackbone` (frozen teachers, trainable fusion) as
the detection one; a new :class:`~mdkd_det.modeling.meta_arch.classifier.ClassifierHead` sits on
its last output. A6, as implemented:

1. per teacher k an adapter ``Conv1x1(C_k -> joint_ch)`` on its last-stage map (maps resized to
   the target teacher's h x w);
2. concatenation along channels -> ``(m+1) * joint_ch`` channels;
3. FA block 1: ``Conv1x1((m+1)*joint_ch -> joint_ch)``, then a pre-norm transformer block over
   the h*w tokens (LayerNorm -> multi-head self-attention with ``joint_ch/64`` heads and
   attention dropout -> residual; LayerNorm -> MLP ratio 4 with dropout -> residual);
4. FA blocks 2..N: the same transformer block at ``joint_ch``;
5. every block ends with a LayerNorm of its output tokens (our addition to A6: the FA outputs
   are the maps Stage 3 distils with FAlgn, an MSE; without it the residual stream grew to a
   raw FAlgn of about 13 against a CE of 0.3 in the demo, so FAlgn dominated Eq. 16).

Every block's output is returned (``output_names`` = ``fa1``..``faN``), so the FusionBackbone
exposes the FA blocks as its levels: the classifier reads the last, and Stage-3 early-k / late-k
selection (C26) picks the first or last k of them.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from .ops import FUSION_REGISTRY, _check_in_channels, align_maps, attention_heads


class FusionAttentionBlock(nn.Module):
    """One FA block (A6 step 3/4): optional Conv1x1 reduction + pre-norm transformer block +
    output LayerNorm (step 5).

    Args:
        in_channels: input channels ((m+1)*joint_ch for block 1, joint_ch after).
        channels: joint_ch.
        attn_dropout, dropout: attention-weight dropout and MLP/residual dropout.
        mlp_ratio: hidden size of the MLP relative to ``channels``.

    Shapes: ``forward(Tensor[B, in_channels, h, w]) -> Tensor[B, channels, h, w]``.
    """

    def __init__(self, in_channels: int, channels: int, attn_dropout: float = 0.0,
                 dropout: float = 0.0, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, channels, 1) if in_channels != channels else nn.Identity()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, attention_heads(channels, max_heads=max(1, channels // 64)), dropout=attn_dropout,
                                          batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, channels), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.reduce(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        y = self.norm1(t)
        t = t + self.drop(self.attn(y, y, y, need_weights=False)[0])
        t = self.norm_out(t + self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(b, c, h, w)


@FUSION_REGISTRY.register("fa_blocks")
class FusionAttentionFusion(nn.Module):
    """Adapters + N Fusion Attention blocks (C10, A6); a multi-output fusion operator.

    Args:
        in_channels: ``C_k`` of each teacher's map, target teacher first.
        out_channels: ``joint_ch`` (Table 9: 256; Table 12: 1024).
        num_blocks: ``FA_blocks`` (Tables 9/12: 3), >= 1.
        attn_dropout, dropout: Tables 9/12 "Attn Dropout" / "Dropout".

    Attributes:
        output_names: ``("fa1", ..., "faN")``; :class:`FusionBackbone` names its levels so.

    Shapes:
        forward(maps: list[Tensor[B, C_k, h_k, w_k]]) -> list of N Tensor[B, joint_ch, h_0, w_0].

    Raises:
        ValueError: bad channels, ``num_blocks`` < 1, maps not matching ``in_channels``.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_blocks: int = 3,
                 attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels = _check_in_channels(in_channels, out_channels, "fa_blocks")
        if int(num_blocks) < 1:
            raise ValueError(f"fusion op 'fa_blocks': num_blocks (FUSION.FA_BLOCKS) must be >= 1, got {num_blocks}")
        self.out_channels = int(out_channels)
        self.adapters = nn.ModuleList(nn.Conv2d(c, self.out_channels, 1) for c in self.in_channels)
        n_in = len(self.in_channels) * self.out_channels
        self.blocks = nn.ModuleList(
            FusionAttentionBlock(n_in if i == 0 else self.out_channels, self.out_channels,
                                 attn_dropout, dropout) for i in range(int(num_blocks)))
        self.output_names = tuple(f"fa{i + 1}" for i in range(int(num_blocks)))

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        """Options from ``FUSION.FA_BLOCKS``, ``FUSION.ATTN_DROPOUT``, ``FUSION.DROPOUT``."""
        f = cfg.FUSION
        return {"num_blocks": int(f.FA_BLOCKS), "attn_dropout": float(f.ATTN_DROPOUT),
                "dropout": float(f.DROPOUT)}

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:  # noqa: D102
        maps = align_maps(maps, self.in_channels, "fa_blocks")
        x = torch.cat([a(m) for a, m in zip(self.adapters, maps)], dim=1)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs
