#!/usr/bin/env python
"""Plot the Stage-1 domain-adversarial curves of one or more runs into one PNG
(docs/fidelity.md, decision F1).

Reads each run's ``metrics.json`` (one JSON object per line, written by the trainer's
JSONWriter; hinted scalars are 20-iteration medians) and draws four panels against the
iteration: ``loss_domain``; ``da_acc_source`` / ``da_acc_target`` (discriminator accuracy,
0.5 = confusion); ``da_bce_source`` / ``da_bce_target`` (ln 2 = confusion); and
``da_grad_norm_detector`` / ``da_grad_norm_disc`` (gradient norms before clipping).

Usage::

    python tools/plot_adversarial_curves.py --out curves.png \\
        "before=out/before/source_teacher_deeplesion_sample_train/metrics.json" \\
        "after=out/after/source_teacher_deeplesion_sample_train/metrics.json"

Exit status 2 on a missing file or a file without Stage-1 scalars.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

PANELS = (
    ("loss_domain (lambda * BCE)", ("loss_domain",)),
    ("discriminator accuracy: source solid, target dashed", ("da_acc_source", "da_acc_target")),
    ("unweighted BCE: source solid, target dashed", ("da_bce_source", "da_bce_target")),
    ("grad norm before clipping: detector solid, discriminator dashed",
     ("da_grad_norm_detector", "da_grad_norm_disc")),
)
#: reference line per panel: confusion for accuracy (0.5) and BCE (ln 2)
REFERENCE = {1: 0.5, 2: 0.6931}


def _rows(path: str) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such metrics.json")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("loss_domain") is not None]
    if not rows:
        raise ValueError(f"{path}: no line with loss_domain (not a Stage-1 run?)")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """Run the tool; returns the exit status (0 ok, 2 bad input)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.json")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--title", default="Stage 1: domain-adversarial source teacher")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        runs = []
        for spec in args.runs:
            label, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"run '{spec}': expected LABEL=path/to/metrics.json")
            runs.append((label, _rows(path)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for idx, (ax, (title, keys)) in enumerate(zip(axes.flat, PANELS)):
        for i, (label, rows) in enumerate(runs):
            for j, k in enumerate(keys):
                pts = [(r["iteration"] + 1, r[k]) for r in rows if r.get(k) is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=f"C{i}", linestyle="-" if j == 0 else "--",
                        marker="o", ms=3, label=label if j == 0 else None)
        if idx in REFERENCE:
            ax.axhline(REFERENCE[idx], color="grey", linestyle=":")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(os.path.abspath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
