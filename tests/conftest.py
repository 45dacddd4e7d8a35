"""Shared pytest setup.

- Sets ``HF_HUB_OFFLINE=1`` and ``NO_ALBUMENTATIONS_UPDATE=1`` (no network here).
- One torch intra-op thread (tiny tensors; avoids OpenMP contention on shared 2-core machines).
- ``MDKD_DATASETS`` defaults to ``../shared/data`` next to the repository (the layout of the
  development machines and CI); tests that need it use the ``data_root`` fixture, which skips
  when the folder is absent.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MDKD_DATASETS", str(_REPO.parent / "shared" / "data"))
# Tests use tiny tensors: one intra-op thread avoids OpenMP spin contention on a shared 2-core
# machine (measured ~10x slower with 2 threads under load) and keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the shared real data (``$MDKD_DATASETS``); skips the test when absent."""
    root = Path(os.environ["MDKD_DATASETS"])
    if not (root / "lungct_roboflow").is_dir():
        pytest.skip(f"shared data not found at {root} (set MDKD_DATASETS)")
    return root
