"""tasks.common.check_settings: a resumable --out never mixes runs made with other settings."""

from __future__ import annotations

import json

import pytest

from tasks.common import check_settings


def test_settings_are_recorded_then_enforced(tmp_path):
    check_settings(tmp_path, {"lr": 0.1, "sizes": (1, 2)}, "runs/*.json")
    assert json.loads((tmp_path / "settings.json").read_text()) == {"lr": 0.1, "sizes": [1, 2]}
    check_settings(tmp_path, {"lr": 0.1, "sizes": (1, 2)}, "runs/*.json")  # same: accepted
    with pytest.raises(SystemExit, match="other settings.*use a new --out"):
        check_settings(tmp_path, {"lr": 0.2, "sizes": (1, 2)}, "runs/*.json")


def test_runs_without_a_record_are_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    with pytest.raises(SystemExit, match="not recorded.*--fresh"):
        check_settings(tmp_path, {"lr": 0.1}, "runs/*.json", fix="use --fresh")
    assert not (tmp_path / "settings.json").exists()
