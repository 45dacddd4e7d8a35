"""Student-side connectors for feature KD (decision A3, FitNets-style).

A connector maps a student map/vector to the teacher's channel count so that FAlgn, CosSim, Con
and ROIKD compare like with like. It is ``Identity`` when channels already match (FPN 256 vs
256), a trainable 1x1 conv (maps) or linear layer (RoI embeddings) otherwise. Connectors belong
to the student's optimizer and are dropped at export.
"""

from __future__ import annotations

from torch import nn

# re-exported (old import path): THE stride matching lives with ShapeSpec (issue 14)
from ..modeling.shape_spec import match_levels_by_stride  # noqa: F401


def feature_connector(student_channels: int, teacher_channels: int) -> nn.Module:
    """``Identity`` if equal, else ``Conv2d(C_s, C_t, 1)``: [B, C_s, H, W] -> [B, C_t, H, W]."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def embedding_connector(student_dim: int, teacher_dim: int) -> nn.Module:
    """``Identity`` if equal, else ``Linear(D_s, D_t)``: [M, D_s] -> [M, D_t]."""
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim)


class LatentAlignmentHead(nn.Module):
    """MSAN encoding/decoding header of paper 001 (GKD, Sec. ACT step 3; loss Eqs. 2-4), as a
    student-side connector: ``encode`` maps a map [B, C, H, W] to a latent S [B, D]
    (1x1 conv + ReLU -> global average pooling -> Linear C->D), ``decode`` maps S back to
    Fhat [B, C, H, W] (Linear D->C, broadcast over H x W, 1x1 conv). 001 gives no layer
    structure; this is the "conv -> GAP -> FC and back" of paper_notes.md §3.1.

    Args:
        channels: C of the student map.
        latent_dim: D (here the teacher's channel count, so S lives in the space of the
            teacher's pooled descriptor, D15.6).
    """

    def __init__(self, channels: int, latent_dim: int) -> None:
        super().__init__()
        self.enc_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.enc_fc = nn.Linear(channels, latent_dim)
        self.dec_fc = nn.Linear(latent_dim, channels)
        self.dec_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def encode(self, f):
        """[B, C, H, W] -> latent [B, D]."""
        return self.enc_fc(self.enc_conv(f).relu().mean(dim=(2, 3)))

    def decode(self, z, size):
        """latent [B, D] -> reconstruction [B, C, H, W] at ``size = (H, W)``."""
        v = self.dec_fc(z)[:, :, None, None]
        return self.dec_conv(v.expand(-1, -1, int(size[0]), int(size[1])))

    def forward(self, f):
        """``(S [B, D], Fhat [B, C, H, W])``."""
        z = self.encode(f)
        return z, self.decode(z, f.shape[-2:])
