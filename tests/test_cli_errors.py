"""Every mistake on ``python -m tasks`` is one line on stderr and exit status 2, with no
traceback, and a mistake found before the work starts leaves ``--out`` untouched (issue 15)."""

from __future__ import annotations

import pytest

from tasks.cli import main

TINY = ["synthetic", "rotation", "--config", "tiny", "--no-progress"]


def _fails(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("item, needle", [
    ("bogus=1", "--set bogus: unknown key; known keys:"),
    ("meta_steps=abc", "--set meta_steps: expected an integer, got 'abc'"),
    ("head_only=maybe", "--set head_only: expected true or false, got 'maybe'"),
    ("meta_lr=inf", "--set meta_lr: expected a finite number"),
    ("meta_steps", "--set expects key=value, got 'meta_steps' (no '=')"),
    ("meta_steps=-5", "`meta_steps` must be >= 0, got -5"),
    ("ift=newton", "`ift` must be one of"),
])
def test_bad_set_is_one_line_and_writes_nothing(tmp_path, capsys, item, needle):
    out = tmp_path / "out"
    _fails(capsys, [*TINY, "--out", str(out), "--set", item], needle)
    assert not out.exists()  # no settings.json: the corrected run is not refused


def test_a_typo_does_not_block_the_corrected_run(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, [*TINY, "--seeds", "1", "--out", str(out), "--set", "meta_steps=-5"])
    assert main([*TINY, "--seeds", "1", "--out", str(out), "--set", "meta_steps=2"]) == 0


@pytest.mark.parametrize("task", [["synthetic", "rotation"], ["ppi"], ["ecg"]])
@pytest.mark.parametrize("seeds", ["0", "-2", "abc", "3-1"])
def test_bad_seeds(tmp_path, capsys, task, seeds):
    _fails(capsys, [*task, "--seeds", seeds, "--out", str(tmp_path / "o")], "--seeds")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("task", [["synthetic", "rotation"], ["ppi"], ["ecg"]])
def test_out_is_a_file(tmp_path, capsys, task):
    f = tmp_path / "file"
    f.write_text("x")
    _fails(capsys, [*task, "--out", str(f)], f"--out {f} is a file")
    _fails(capsys, [*task, "--out", str(f / "sub")], "is a file, so the folder cannot be created")


@pytest.mark.parametrize("task", [["synthetic", "rotation"], ["ppi"], ["ecg"]])
def test_out_is_not_writable(capsys, task):
    # /proc accepts no new files, even from root (for whom permission bits do not count)
    _fails(capsys, [*task, "--out", "/proc/hypergrad_out/run"], "cannot write in /proc")


@pytest.mark.parametrize("task", [["synthetic", "rotation"], ["ppi"], ["ecg"]])
def test_threads_zero(tmp_path, capsys, task):
    _fails(capsys, [*task, "--threads", "0", "--out", str(tmp_path / "o")],
           "--threads must be >= 1, got 0")


@pytest.mark.parametrize("task", [["synthetic", "rotation"], ["ppi"], ["ecg"]])
def test_missing_data_dir(tmp_path, capsys, task):
    _fails(capsys, [*task, "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
           "--data-dir", "nope")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["ecg", "--set", "P=0"], "`P` must be positive, got 0"),
    (["ppi", "--set", "meta_steps=0"], "`meta_steps` must be >= 1, got 0"),
    (["ppi", "--set", "gin.num_layers=x"], "--set gin.num_layers: expected an integer"),
    (["ecg", "--set", "warp=200"], "`warp` (200.0) must be <= `warp_max`"),
    (["ecg", "--n-ft", "0"], "--n-ft must be positive integers"),
    (["ecg", "--method", "nope"], "--method: unknown ['nope']"),
    (["ppi", "--method", "nope"], "--method: unknown ['nope']"),
])
def test_values_once_checked_late_are_checked_first(tmp_path, capsys, argv, needle):
    _fails(capsys, [*argv, "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["nope"], "unknown task 'nope'"),
    (["synthetic"], "name an experiment: rotation, noisy"),
    (["synthetic", "bogus"], "unknown experiment 'bogus'"),
    (["ppi", "--bogus"], "unrecognized arguments: --bogus"),
    (["ppi", "--config", "nope"], "invalid choice: 'nope'"),
    (["ecg", "--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
])
def test_unknown_names(tmp_path, capsys, argv, needle):
    _fails(capsys, [*argv, "--out", str(tmp_path / "o")] if len(argv) > 1 else argv, needle)


def test_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails(capsys, [*TINY, "--device", "cuda", "--out", str(tmp_path / "o")],
           "no CUDA device is available")


def test_corrupt_result_file_is_named_with_fresh(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    (out / "seed0" / "result.json").write_text('{"phi": ')
    _fails(capsys, argv, f"{out / 'seed0' / 'result.json'} is corrupt", "--fresh")
    assert main([*argv, "--fresh"]) == 0  # the advice works


def test_corrupt_settings_file_is_named_with_fresh(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_bytes(b"\x00\xff garbage")
    _fails(capsys, [*TINY, "--out", str(out)], "settings.json is corrupt", "--fresh")


def test_corrupt_checkpoint_is_named_with_fresh(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    (out / "seed0" / "result.json").unlink()  # the seed is unfinished: its checkpoint resumes
    (out / "seed0" / "ckpt.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, argv, str(out / "seed0" / "ckpt.pt"), "--fresh")


def test_corrupt_result_tensor_file_is_named_with_fresh(tmp_path):
    """ECG / PPI pre-training results and CoTrain checkpoints load through load_file."""
    from tasks.harness import CLIError, load_file

    f = tmp_path / "simclr_s0.pt"
    f.write_bytes(b"garbage")
    with pytest.raises(CLIError, match=r"simclr_s0\.pt is corrupt.*--fresh"):
        load_file(f)


def test_other_settings_in_out_are_refused_without_writing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "settings.json").read_text()
    _fails(capsys, [*argv, "--set", "K=3"], "holds runs made with other settings", "--fresh")
    assert (out / "settings.json").read_text() == before


def test_help_lists_configs_methods_and_set_keys(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ppi", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "configs: smoke, synthetic, paper" in text and "methods: no_pt, graph_sup_pt" in text
    assert "  meta_steps=200" in text and "  gin.num_layers=" in text


def test_a_late_failure_does_not_block_the_corrected_run(tmp_path, capsys):
    """settings.json without any result or checkpoint (a run that failed before its first
    result) does not refuse the next run; a checkpoint of other settings does."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text('{"old": "settings"}')
    assert main([*TINY, "--seeds", "1", "--out", str(out)]) == 0
    other = tmp_path / "other"
    (other / "seed0").mkdir(parents=True)
    (other / "settings.json").write_text('{"old": "settings"}')
    (other / "seed0" / "ckpt.pt").write_bytes(b"a checkpoint of other settings")
    _fails(capsys, [*TINY, "--seeds", "1", "--out", str(other)], "other settings")
