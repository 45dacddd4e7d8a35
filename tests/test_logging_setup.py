"""default_setup's logging: stdout resolved at emit time, log.txt follows OUTPUT_DIR."""

import io
import logging
import sys

from mdkd_det.config import get_cfg
from mdkd_det.engine.defaults import default_setup


def test_log_file_follows_output_dir_and_stdout_is_looked_up_at_emit(tmp_path, monkeypatch):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for name in ("a", "b"):
            cfg = get_cfg()
            cfg.OUTPUT_DIR = str(tmp_path / name)
            default_setup(cfg)
            logging.getLogger("mdkd_det.test").info("run %s", name)
        assert "run a" in (tmp_path / "a" / "log.txt").read_text()
        b = (tmp_path / "b" / "log.txt").read_text()
        assert "run b" in b and "run a" not in b
        old = io.StringIO()
        monkeypatch.setattr(sys, "stdout", old)
        old.close()  # a replaced, closed stdout (pytest capture) is never written to
        new = io.StringIO()
        monkeypatch.setattr(sys, "stdout", new)
        logging.getLogger("mdkd_det.test").info("after swap")
        assert "after swap" in new.getvalue()
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
                h.close()
