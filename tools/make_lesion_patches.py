#!/usr/bin/env python
"""Crop the lesion-patch classification dataset from the three shared detection sets.

Examples::

    python tools/make_lesion_patches.py --out /tmp/lesion_patches
    python tools/make_lesion_patches.py --config-file configs/LesionPatch/mdkd_effnet_demo.yaml \\
        --out /tmp/lp DATASETS.LESION_PATCH.NEG_PER_IMAGE 3

Lesion-centred positives and lesion-free negatives, seeded, patient-level train/val/test split
per domain (LungCT = target, Lung-PET-CT-Dx, DeepLesion sample); see
:mod:`mdkd_det.data.datasets.lesion_patch`. Without ``--out`` the folder is the one configs use
(``DATASETS.LESION_PATCH.DIR`` or the cache folder), which training also builds on first use.
Prints the manifest counts. Exit status 2 with a one-line message on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Build the patches; returns the exit status (0 ok, 2 dataset/config error)."""
    from mdkd_det.config import get_cfg
    from mdkd_det.data.datasets.lesion_patch import build_lesion_patches, default_patch_dir
    from mdkd_det.utils.errors import ConfigError, DatasetError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", help="config whose DATASETS.* / INPUT.WINDOW to use")
    p.add_argument("--out", default="", help="output folder (default: the config's patch folder)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing folder")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = get_cfg()
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        if args.opts:
            cfg.merge_from_list(args.opts)
        out = os.path.abspath(args.out or default_patch_dir(cfg))
        build_lesion_patches(cfg, out, overwrite=args.overwrite)
    except (DatasetError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    print(out)
    print(json.dumps({"counts": manifest["counts"], "patients": manifest["patients"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
