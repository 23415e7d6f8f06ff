"""tasks.harness: the settings guard (a resumable --out never mixes runs made with other
settings), --set key=value overrides, --seeds, and the shared aggregation (tasks.tables)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tasks.harness import (
    CLIError,
    apply_overrides,
    cached,
    check_settings,
    parse_seeds,
    record_settings,
)
from tasks.tables import compare, paired_difference, per_seed


def test_settings_are_recorded_then_enforced(tmp_path):
    check_settings(tmp_path, {"lr": 0.1, "sizes": (1, 2)}, "runs/*.json")  # nothing recorded
    assert not (tmp_path / "settings.json").exists()  # checking never writes
    record_settings(tmp_path, {"lr": 0.1, "sizes": (1, 2)})
    assert json.loads((tmp_path / "settings.json").read_text()) == {"lr": 0.1, "sizes": [1, 2]}
    check_settings(tmp_path, {"lr": 0.2}, "runs/*.json")  # no work yet: nothing to mix with
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    check_settings(tmp_path, {"lr": 0.1, "sizes": (1, 2)}, "runs/*.json")  # same: accepted
    with pytest.raises(CLIError, match="other settings.*--fresh"):
        check_settings(tmp_path, {"lr": 0.2, "sizes": (1, 2)}, ("ckpt/*", "runs/*.json"))


def test_runs_without_a_record_are_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    with pytest.raises(CLIError, match="not recorded.*--fresh"):
        check_settings(tmp_path, {"lr": 0.1}, "runs/*.json")
    assert not (tmp_path / "settings.json").exists()


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4


@dataclasses.dataclass(frozen=True)
class Cfg:
    flag: bool = False
    n: int = 1
    lr: float = 0.1
    angles: tuple = (0.0,)
    name: str = "a"
    path: str | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"`n` must be >= 0, got {self.n}")


def test_overrides_are_parsed_with_each_fields_type():
    c = apply_overrides(Cfg(), ["flag=yes", "n=3", "lr=1e-3", "angles=1,2.5", "name=b",
                                "path=/x", "inner.width=8"])
    assert c == Cfg(True, 3, 1e-3, (1.0, 2.5), "b", "/x", Inner(8))
    assert apply_overrides(c, ["flag=0"]) == dataclasses.replace(c, flag=False)
    assert apply_overrides(Cfg(), ["path=none"]).path is None
    assert apply_overrides(c, []) is c
    with pytest.raises(CLIError, match="bogus: unknown key; known keys: angles, flag"):
        apply_overrides(c, ["bogus=1"])
    with pytest.raises(CLIError, match="no '='"):
        apply_overrides(c, ["n"])
    with pytest.raises(CLIError, match="expected true or false"):
        apply_overrides(c, ["flag=maybe"])  # not silently False
    with pytest.raises(CLIError, match="n: expected an integer"):
        apply_overrides(c, ["n=three"])
    with pytest.raises(CLIError, match="lr: expected a finite number"):
        apply_overrides(c, ["lr=nan"])
    with pytest.raises(CLIError, match="`n` must be >= 0, got -5"):  # the config's own check
        apply_overrides(c, ["n=-5"])


def test_seeds_are_a_count_or_ids():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,4") == [0, 4] and parse_seeds("10-12") == [10, 11, 12]
    for bad in ("0", "-2", "a", "3-1", ","):
        with pytest.raises(CLIError, match="--seeds"):
            parse_seeds(bad)


def test_cached_reuses_and_names_a_corrupt_file(tmp_path):
    calls = []
    f = tmp_path / "r.json"
    assert cached(f, lambda: calls.append(1) or {"a": 1}) == {"a": 1}
    assert cached(f, lambda: calls.append(1) or {"a": 2}) == {"a": 1} and calls == [1]
    f.write_text('{"a": ')
    with pytest.raises(CLIError, match=r"r\.json is corrupt.*--fresh"):
        cached(f, lambda: {"a": 3})


def test_compare_pairs_methods_on_shared_seeds():
    per_seed = {"base": {0: 0.5, 1: 0.6, 2: 0.7}, "new": {0: 0.6, 1: 0.8}}
    rows = compare(per_seed, baseline="base")
    assert rows["new"]["n"] == 2 and "paired" not in rows["base"]
    assert rows["new"]["paired"]["seeds"] == [0, 1]
    assert rows["new"]["paired"]["mean"] == pytest.approx(0.15)
    custom = compare(per_seed, baseline="base", paired=lambda a, b: {"k": len(a)})
    assert custom["new"]["paired"] == {"k": 2}
    assert paired_difference({0: 1.0}, {1: 2.0})["n"] == 0  # no shared seed


def test_per_seed_collects_run_records_by_method_and_seed():
    recs = [{"method": "a", "seed": 0, "auc": 0.5, "n": 1}, {"method": "a", "seed": 0, "auc": 0.7,
             "n": 1}, {"method": "a", "seed": 1, "auc": 0.9, "n": 1},
            {"method": "b", "seed": 0, "auc": 0.1, "n": 2}]
    got = per_seed(recs, lambda r: r["auc"], where=lambda r: r["n"] == 1)
    assert got == {"a": {0: pytest.approx(0.6), 1: 0.9}}
