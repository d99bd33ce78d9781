"""The trial around the loop (trial.py): what a full disk at the end costs."""
import logging
import os

import pytest

import main
import trial
from tests.test_runs import DiskFull


def test_a_full_disk_at_the_end_names_the_file_and_the_result_is_logged_first(tmp_path, monkeypatch, caplog):
    cfg = main.compose("experiment=demo", "dataset=synthetic", "debug=fast", "save=true",
                       f"paths.cache_dir={tmp_path / 'cache'}", f"paths.out_root={tmp_path / 'out'}")
    parts = main.build(cfg)
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: DiskFull(fdopen(*a, **k)))
    with caplog.at_level(logging.INFO, logger="trial"), \
            pytest.raises(OSError, match=rf"cannot write {tmp_path / 'run' / 'trained.pt'}: No space left on device"):
        trial.run(cfg, parts, tmp_path / "run")
    assert "final top-1:" in caplog.text  # the result is in the log before the write that failed
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # and no partial file
