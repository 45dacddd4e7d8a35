"""Fréchet (semantic) distance between embedding sets: paper 001 (GKD) Eq. 11, FSD.

    FD(X, Y) = ||mu_x - mu_y||^2 + Tr(Sigma_x + Sigma_y - 2 (Sigma_x Sigma_y)^{1/2})

(the FID form; ``squared_mean=False`` gives Eq. 11 as printed, with the unsquared norm). Used to
compare the embeddings of a student, its teacher and the dataset-specific baseline across
domains: :func:`fsd_report` gives, per model, the distance between its embeddings of each pair
of domains (lower = more domain-invariant) and, per domain, the distance of each model to a
reference model (lower = closer to the teacher). Embeddings: :func:`backbone_embeddings`
(global-average-pooled backbone level per image) or any ``[N, D]`` array.

CLI (one ``.npz`` per model, one array per domain, e.g. written by ``numpy.savez``)::

    python -m mdkd_det.evaluation.fsd --ref teacher teacher=t.npz student=s.npz baseline=b.npz

prints the report as JSON (docs/kd_terms.md, "FSD"). The ``.npz`` of a trained model::

    python -m mdkd_det.evaluation.fsd extract --config-file C.yaml --weights model.pth \
        --datasets lungct_disjoint_test lung_pet_ct_dx_all --limit 64 --out student.npz
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy import linalg
from torch import nn

__all__ = ["frechet_distance", "backbone_embeddings", "dataset_embeddings", "fsd_report"]


def frechet_distance(a, b, squared_mean: bool = True, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to ``a`` [N, D] and ``b`` [M, D] (001 Eq. 11).

    Means and unbiased covariances (``np.cov``, ddof = 1); ``sqrtm`` by scipy, imaginary round-off
    dropped; if the product is singular, ``eps`` is added to both diagonals (as in FID code).

    Args:
        a, b: embeddings (numpy or torch), N, M >= 2 rows, same D.
        squared_mean: ``||mu_a - mu_b||^2`` (FID, default) or the unsquared norm (Eq. 11 as
            printed).

    Returns:
        float >= 0 (up to round-off).

    Raises:
        ValueError: not 2-D, different D, or fewer than 2 rows.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: needs [N, D] and [M, D] with N, M >= 2, got {a.shape}, {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s_a)) * eps
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    diff = np.linalg.norm(mu_a - mu_b)
    mean_term = diff ** 2 if squared_mean else diff
    return float(mean_term + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))


@torch.no_grad()
def backbone_embeddings(model: nn.Module, images: Sequence[torch.Tensor], level: Optional[str] = None,
                        batch_size: int = 8) -> np.ndarray:
    """Per-image embeddings [N, C]: the global average pool of ``model.backbone`` level
    ``level`` (default: the last) on images already normalised as the model's backbone expects
    ([C, H, W] each, same size within a batch). Eval mode, no grad.

    Raises:
        KeyError: ``level`` is not a backbone output.
    """
    inner = model.module if hasattr(model, "module") else model
    was = inner.training
    inner.eval()
    rows = []
    for i in range(0, len(images), batch_size):
        feats = inner.backbone(torch.stack(list(images[i:i + batch_size])))
        f = feats[level] if level is not None else list(feats.values())[-1]
        rows.append(f.float().mean(dim=(2, 3)).cpu())
    inner.train(was)
    return torch.cat(rows).numpy()


@torch.no_grad()
def dataset_embeddings(cfg, model: nn.Module, dataset_name: str, limit: int = 64,
                       level: Optional[str] = None) -> np.ndarray:
    """Per-image embeddings [N, C] of the first ``limit`` images of ``dataset_name`` (detection
    test mapper, :class:`~mdkd_det.data.mapper.DatasetMapper`): a detector's own input transform (torchvision ``model.transform``:
    resize + normalise + pad) when it has one, then :func:`backbone_embeddings`' pooling.

    Raises:
        DatasetError / ConfigError: unknown or unreadable dataset (from the data layer).
    """
    from ..data.build import build_detection_test_loader, get_dataset_records

    records = get_dataset_records(cfg, [dataset_name], int(limit))
    inner = model.module if hasattr(model, "module") else model
    inner.eval()
    rows = []
    for batch in build_detection_test_loader(cfg, dataset_name, records=records):
        images = [x["image"] for x in batch]
        x = inner.transform(images)[0].tensors if hasattr(inner, "transform") else torch.stack(images)
        feats = inner.backbone(x)
        f = feats[level] if level is not None else list(feats.values())[-1]
        rows.append(f.float().mean(dim=(2, 3)).cpu())
    return torch.cat(rows).numpy()


def fsd_report(embeddings: Mapping[str, Mapping[str, np.ndarray]], reference: Optional[str] = None,
               squared_mean: bool = True) -> Dict[str, Dict[str, float]]:
    """Fréchet distances of ``{model: {domain: [N, D]}}``:

    - ``"domain_gap"``: ``{"model: dA|dB": FD}`` for every model and pair of its domains;
    - ``"to_reference"``: ``{"model @ domain": FD(model, reference)}`` for every other model and
      domain the reference also has (when ``reference`` is given).

    Raises:
        KeyError: ``reference`` is not a model of ``embeddings``.
    """
    out: Dict[str, Dict[str, float]] = {"domain_gap": {}, "to_reference": {}}
    for m, doms in embeddings.items():
        for d1, d2 in itertools.combinations(sorted(doms), 2):
            out["domain_gap"][f"{m}: {d1}|{d2}"] = frechet_distance(doms[d1], doms[d2], squared_mean)
    if reference is not None:
        ref = embeddings[reference]
        for m, doms in embeddings.items():
            if m == reference:
                continue
            for d in sorted(set(doms) & set(ref)):
                out["to_reference"][f"{m} @ {d}"] = frechet_distance(doms[d], ref[d], squared_mean)
    return out


def extract_main(argv: Sequence[str]) -> int:
    """``extract --config-file C --weights W --datasets d1 d2 --out emb.npz [--limit N]``: one
    model's :func:`dataset_embeddings` per dataset, saved as one array per dataset name."""
    from ..config import get_cfg
    from ..engine.checkpointer import Checkpointer
    from ..modeling import build_model

    p = argparse.ArgumentParser(prog="python -m mdkd_det.evaluation.fsd extract")
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=64)
    args = p.parse_args(list(argv))
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", 0])
    model = build_model(cfg)
    Checkpointer(model, trust_checkpoints=bool(cfg.MODEL.TRUST_CHECKPOINTS)).load(args.weights)
    np.savez(args.out, **{d: dataset_embeddings(cfg, model, d, args.limit) for d in args.datasets})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``name=file.npz`` per model (arrays = domains); prints :func:`fsd_report` as JSON.
    ``extract ...`` writes such a file from a config and checkpoint (:func:`extract_main`)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["extract"]:
        return extract_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m mdkd_det.evaluation.fsd", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="name=embeddings.npz (one [N, D] array per domain)")
    p.add_argument("--ref", default=None, help="reference model name (e.g. the teacher)")
    p.add_argument("--paper-literal", action="store_true", help="unsquared mean term (Eq. 11 as printed)")
    args = p.parse_args(argv)
    embs = {}
    for item in args.models:
        name, _, path = item.partition("=")
        if not path:
            p.error(f"expected name=file.npz, got {item!r}")
        with np.load(path) as z:
            embs[name] = {k: z[k] for k in z.files}
    if args.ref is not None and args.ref not in embs:
        p.error(f"--ref {args.ref!r} is not one of {sorted(embs)}")
    print(json.dumps(fsd_report(embs, args.ref, squared_mean=not args.paper_literal), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
