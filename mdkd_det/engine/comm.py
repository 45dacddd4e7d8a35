"""Deprecated alias of :mod:`mdkd_det.utils.comm` (moved there in issue 14, as detectron2 keeps
``comm`` in ``utils``); will be removed after one release.

``import mdkd_det.engine.comm`` returns the :mod:`mdkd_det.utils.comm` module object itself, so
attribute reads and ``monkeypatch.setattr`` act on the one module.
"""

import sys
import warnings

from ..utils import comm as _comm

warnings.warn("mdkd_det.engine.comm is deprecated: use mdkd_det.utils.comm", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _comm
