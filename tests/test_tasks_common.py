"""tasks.common: check_settings (a resumable --out never mixes runs made with other settings)
and apply_overrides (the CLIs' --set key=value)."""

from __future__ import annotations

import json

import pytest

from tasks.common import apply_overrides, check_settings


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


def test_overrides_are_parsed_with_each_fields_type():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        flag: bool = False
        n: int = 1
        lr: float = 0.1
        angles: tuple = (0.0,)
        name: str = "a"
        path: str | None = None

    c = apply_overrides(Cfg(), ["flag=yes", "n=3", "lr=1e-3", "angles=1,2.5", "name=b",
                                "path=/x"])
    assert c == Cfg(True, 3, 1e-3, (1.0, 2.5), "b", "/x")
    assert apply_overrides(c, ["flag=0"]) == Cfg(False, 3, 1e-3, (1.0, 2.5), "b", "/x")
    assert apply_overrides(Cfg(), ["path=none"]).path is None
    assert apply_overrides(c, []) is c
    with pytest.raises(ValueError, match="key one of"):
        apply_overrides(c, ["bogus=1"])
    with pytest.raises(ValueError, match="key one of"):
        apply_overrides(c, ["n"])
    with pytest.raises(ValueError, match="expected true/false"):
        apply_overrides(c, ["flag=maybe"])  # not silently False
    with pytest.raises(ValueError):
        apply_overrides(c, ["n=three"])
