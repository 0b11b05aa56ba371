"""Every error a user can cause from the command line is one line on stderr and exit 2, before any
run folder or Ray exists: unusable --output folders, model options that do not fit the data,
unreadable run folders given to ``report`` and ``partition``, a data_dir without the data."""

from __future__ import annotations

import json

import pytest

from fedalign.cli import main
from tests.helpers import DIGITS


def one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def run_digits(tmp_path, *settings: str) -> int:
    sets = [arg for setting in settings for arg in ("--set", setting)]
    return main(["run", str(DIGITS), "--output", str(tmp_path / "out"), "--no-progress", *sets])


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    # in this process: on Ray the run would start Ray (7 s) before it finds the output a file
    sets = ["--set", "simulation.backend=inprocess"]
    code = main(["run", str(DIGITS), "--output", str(tmp_path / "file"), "--no-progress", *sets])
    assert "cannot create a run folder in it" in one_line_error(capsys, code)


def test_model_options_that_do_not_fit_the_data_fail_before_any_folder(tmp_path, capsys):
    code = run_digits(tmp_path, "model={name: lenet}")  # digits are 8x8, LeNet needs 12x12
    assert "config error: model: LeNet needs images of at least 12x12" in one_line_error(
        capsys, code
    )
    assert not (tmp_path / "out").exists()


def test_an_empty_data_dir_names_the_missing_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = run_digits(tmp_path, "data.dataset=fashion-mnist", f"data.data_dir={tmp_path / 'empty'}")
    err = one_line_error(capsys, code)
    assert "data_dir" in err and "lacks train-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"round": 0, "test_accuracy": 0.1}\n{"round": 1, "test_acc', "not metrics rows"),
        (b"[1, 2, 3]\n", "not metrics rows"),
        (b'{"test_accuracy": 0.5}\n', "not metrics rows"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not text"),
    ],
)
def test_report_on_an_unreadable_metrics_file_is_one_line(tmp_path, capsys, content, reason):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    assert reason in one_line_error(capsys, main(["report", str(tmp_path)]))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"dataset": "digits", "label_hist', "not valid JSON"),
        (b"[1, 2, 3]", "no label_histogram"),
        (json.dumps({"dataset": "digits"}).encode(), "no label_histogram"),
        (b"\xff\xfe\x00binary", "not text"),
    ],
)
def test_partition_on_an_unreadable_file_is_one_line(tmp_path, capsys, content, reason):
    (tmp_path / "partition.json").write_bytes(content)
    assert reason in one_line_error(capsys, main(["partition", str(tmp_path)]))


def test_partition_of_a_folder_without_one_is_one_line(tmp_path, capsys):
    assert "partition.json is missing" in one_line_error(capsys, main(["partition", str(tmp_path)]))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.in_features=10", "model: mlp does not take digits's examples (shape (1, 8, 8))"),
        ("model.num_classes=3", "digits has 10 classes"),
        ("model.name=vgg9", "model.hidden: expected an integer, got [64]"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_one_line_before_any_folder(
    tmp_path, capsys, setting, message
):
    code = run_digits(tmp_path, setting)
    assert message in one_line_error(capsys, code)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the config file is empty"),
        (b"# only a comment\n", "the config file is empty"),
        (b"\x89PNG\r\n\x1a\n\xff\xfe", "not a config file (not UTF-8 text)"),
        (b"data: [1\n", "not valid YAML at line 2"),
        (b"- 1\n- 2\n", "a config is a mapping of sections"),
    ],
)
def test_an_unusable_config_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    code = main(["run", str(path), "--output", str(tmp_path / "out"), "--no-progress"])
    assert message in one_line_error(capsys, code)
    assert not (tmp_path / "out").exists()


def test_a_misspelled_key_or_name_gets_a_suggestion(capsys):
    code = main(["config", "--set", "trian.lr=0.1"])
    assert "unknown key 'trian' (did you mean 'train'?)" in one_line_error(capsys, code)
    code = main(["config", "--set", "aggregation.fuse=medain"])
    assert "(did you mean 'median'?)" in one_line_error(capsys, code)


def test_config_takes_a_shipped_name_and_overrides_without_a_file(capsys):
    assert main(["config", "quickstart", "--set", "seed=7"]) == 0
    shown = capsys.readouterr().out
    assert "name: quickstart" in shown and "seed: 7" in shown
    assert main(["config", "--set", "seed=5"]) == 0
    assert "\nseed: 5\n" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fedalign ")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = 1\nraise RuntimeError('boom')\n", "plugin.py, line 2: RuntimeError: boom"),
        (
            "import fedalign\nfedalign.register_model('mlp', object)\n",
            "line 2: RegistryError: model 'mlp' is already registered",
        ),
    ],
)
def test_a_plugin_that_fails_is_one_line(tmp_path, capsys, source, message):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(source)
    assert message in one_line_error(capsys, main(["config", "--plugin", str(plugin)]))


def test_report_out_that_is_a_file_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 0, "test_accuracy": 0.5}\n')
    (tmp_path / "taken").write_text("")
    err = one_line_error(capsys, main(["report", str(run), "--out", str(tmp_path / "taken")]))
    assert "--out" in err and "is a file" in err
