#!/usr/bin/env python
"""Detect lesions with a trained detector on CT files, DICOM series and NIfTI volumes.

The same as the installed ``mdkd-predict`` command (:mod:`mdkd_det.engine.predict_cli`); run
``tools/predict.py --help`` for the options and examples.
"""

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdkd_det.engine.predict_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
