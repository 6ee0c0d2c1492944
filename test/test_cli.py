"""The ``ttspec`` command as a user meets it: help for every subcommand, and bad input refused
with one line naming it (exit status 2, no traceback, nothing left behind)."""

from __future__ import annotations

import pytest

from ttspec_ros import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_prints_its_help(command, capsys):
    # make-bag's help once raised: a "90 %" in a help string is a format directive to argparse
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: ttspec {command}" in capsys.readouterr().out


def test_version_is_the_package_release(capsys):
    from ttspec_ros import __version__

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"ttspec_ros {__version__}"


def _refused(argv: list[str], capsys, *expected: str) -> str:
    """``ttspec argv`` is refused: exit status 2 and one line naming the command and the
    reason (tracebacks and argparse usage screens are what this replaced)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ttspec {argv[0]}: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# Each command that loads a model, with the option naming it; OUT is where it would write.
MODEL_COMMANDS = [
    ["eval-exits", "--out", "OUT", "--model", "MODEL"],
    ["export-onnx", "--out", "OUT", "--model", "MODEL"],
    ["bench-update", "--out", "OUT", "--models", "demo", "--demo-model", "MODEL"],
    ["bench-backends", "--out", "OUT", "--models", "demo", "--demo-model", "MODEL",
     "--backends", "torch"],
    ["specialize-experiment", "--out", "OUT", "--subset", "bags", "--model", "MODEL"],
    ["forgetting-experiment", "--out", "OUT", "--model", "MODEL"],
    ["make-anchors", "--out", "OUT.safetensors", "--model", "MODEL"],
    ["ttt-experiment", "--out", "OUT", "--model", "MODEL"],
]


def _bad_models(tmp_path):
    (tmp_path / "dir.safetensors").mkdir()  # read as IsADirectoryError, a traceback
    (tmp_path / "dir.json").write_text("{}")
    (tmp_path / "card.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "card.json").write_text("{}")
    return {"missing": (tmp_path / "nope", "nope.safetensors not found"),
            "directory": (tmp_path / "dir.safetensors", "dir.safetensors not found as a file"),
            "bad card": (tmp_path / "card", "missing field(s) model_id")}


@pytest.mark.parametrize("bad", ["missing", "directory", "bad card"])
@pytest.mark.parametrize("argv", MODEL_COMMANDS, ids=lambda a: a[0])
def test_a_bad_model_is_refused_in_one_line_and_nothing_is_written(argv, bad, tmp_path,
                                                                    capsys):
    model, message = _bad_models(tmp_path)[bad]
    out = tmp_path / "out"
    argv = [str(model) if a == "MODEL" else a.replace("OUT", str(out)) for a in argv]
    _refused(argv, capsys, message)
    assert not list(tmp_path.glob("out*"))  # export-onnx, bench-update, ... left an empty --out


@pytest.mark.parametrize("argv", [
    ["eval-exits", "--out", "FILE"],
    ["bench-exits", "--out", "FILE/sub"],
    ["train", "--out", "FILE/stem"],  # noticed only after the whole training run
    ["make-anchors", "--out", "DIR"],
    ["demo", "--out", "FILE"],
    ["export-onnx", "--out", "FILE/graphs"],
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(argv, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    argv = [a.replace("FILE", str(tmp_path / "file")).replace("DIR", str(tmp_path))
            for a in argv]
    _refused(argv, capsys, "output ")
    assert (tmp_path / "file").read_text() == "a regular file"


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr must be > 0"),
    ("--lr", "-1e-3", "--lr must be > 0"),
    ("--weight-decay", "inf", "--weight-decay must be >= 0 and finite"),
    ("--ema", "1.5", "--ema must be in [0, 1)"),
    ("--mask-ratio", "1.5", "--mask-ratio must be in (0, 1)"),
    ("--label-smoothing", "5", "--label-smoothing must be in [0, 1)"),
    ("--drop-path", "2", "--drop-path must be in [0, 1)"),
    ("--shift", "-3", "--shift must be >= 0"),
    ("--channels", "0,32,64,128", "--channels and --layers must be >= 1"),
])
def test_train_refuses_bad_numbers_before_training(option, value, message, tmp_path, capsys):
    _refused(["train", "--out", str(tmp_path / "m"), f"{option}={value}"], capsys, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["bench-update", "bench-backends"])
def test_benchmarks_refuse_an_empty_model_list(command, tmp_path, capsys):
    # they ran nothing and wrote empty results with exit status 0
    _refused([command, "--out", str(tmp_path / "o"), "--models", ","], capsys,
             "--models names no model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, option", [
    ("bench-update", "--seed"), ("specialize-experiment", "--seed"), ("make-anchors", "--seed"),
    ("forgetting-experiment", "--seed"), ("bench-ros", "--seed"), ("train", "--seed"),
    ("ttt-experiment", "--corruption-seed"), ("make-corrupted", "--split-seed"),
])
def test_a_negative_seed_is_refused_while_parsing(command, option, capsys):
    # numpy's generators refused it mid-run with a traceback naming no option
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--out", "never", "--subset", "bags", f"{option}=-1"])
    assert exited.value.code == 2
    assert f"argument {option}: a seed must be in 0..4294967295, got -1" in capsys.readouterr().err
    # torch refused 2**64 mid-run ("Overflow when unpacking long long"), naming no option
    with pytest.raises(SystemExit):
        cli.main([command, "--out", "never", "--subset", "bags", f"{option}={2**64}"])
    assert f"a seed must be in 0..4294967295, got {2**64}" in capsys.readouterr().err



@pytest.mark.parametrize("command, option", [
    ("train", "--threads"), ("eval-exits", "--threads"), ("bench-exits", "--threads"),
    ("bench-update", "--threads"), ("bench-backends", "--threads"),
    ("specialize-experiment", "--threads"), ("forgetting-experiment", "--threads"),
    ("make-anchors", "--threads"), ("ttt-experiment", "--threads"),
])
@pytest.mark.parametrize("value", ["0", "100000"])
def test_a_thread_count_out_of_range_is_refused_while_parsing(command, option, value, capsys):
    # 0 was refused after the options were read; 100000 hung in torch without a word (bench-ros
    # checks --num-threads against the classifier's parameter range instead)
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--out", "never", "--subset", "bags", f"{option}={value}"])
    assert exited.value.code == 2
    assert f"argument {option}: must be in 1..256, got {value}" in capsys.readouterr().err

@pytest.mark.parametrize("command", ["specialize-experiment", "forgetting-experiment"])
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "lr must be > 0 and finite, got nan"),
    ("--momentum", "5", "momentum must be in [0, 1), got 5.0"),
    ("--batch-size", "0", "batch_size must be >= 1, got 0"),
    ("--min-confidence", "2", "min_confidence must be in [0, 1], got 2.0"),
    ("--guard-rehearsal", "-1", "guard rehearsal must be >= 0, got -1"),
    ("--guard-tolerance", "nan", "guard tolerance must be finite and >= 0, got nan"),
    ("--guard-class-tolerance", "inf", "guard class_tolerance must be finite and >= 0"),
])
def test_specialization_settings_are_refused_before_the_model_loads(command, option, value,
                                                                    message, tmp_path, capsys):
    # they were checked only when the Specializer was built, after the model, the pool and the
    # test features: the missing model below would have been named instead
    _refused([command, "--out", str(tmp_path / "o"), "--subset", "bags",
              "--model", str(tmp_path / "missing"), f"{option}={value}"], capsys, message)
    assert not (tmp_path / "o").exists()


def test_specialize_experiment_refuses_a_negative_replay_size(tmp_path, capsys):
    _refused(["specialize-experiment", "--out", str(tmp_path / "o"), "--subset", "bags",
              "--model", str(tmp_path / "missing"), "--replay-size=-1"], capsys,
             "replay_size must be >= 0, got -1")


@pytest.mark.parametrize("argv, message", [
    (["bench-ros", "--rate", "0"], "--rate must be > 0, got 0.0"),  # ZeroDivisionError
    (["bench-ros", "--rate", "nan"], "--rate must be a finite number > 0, got nan"),
    (["bench-ros", "--seconds", "inf"], "--seconds must be a finite number >= 0"),
    (["bench-ros", "--size", "0"], "--size must be >= 1, got 0"),
    (["bench-ros", "--size", "100000"], "--size must be at most 1024 px"),
    (["bench-ros", "--adapt-lr", "nan"], "--adapt-lr must be > 0, or negative"),
    (["bench-ros", "--adapt-classes", "hats"], "--adapt-classes 'hats' is not one of"),
    (["bench-ros", "--num-threads", "0"], "--num-threads: num_threads = 0 is outside"),
    (["bench-ros", "--namespace", "9lives"], "namespace '9lives' is not a ROS namespace"),
    (["bench-ros", "--model", "MISSING"], "missing.safetensors not found as a file"),
    (["ttt-ros", "--rate", "inf"], "--rate > 0 and finite"),
    (["ttt-ros", "--ttt-lr", "nan"], "adapter: ttt_learning_rate must be finite, got nan"),
    (["ttt-ros", "--namespace", "a//b"], "namespace 'a//b' is not a ROS namespace"),
    (["ttt-ros", "--model", "MISSING"], "missing.safetensors not found as a file"),
])
def test_ros_benchmarks_refuse_bad_options_before_a_node_starts(argv, message, tmp_path,
                                                               capsys):
    # each was noticed only once the nodes ran (a traceback, or two minutes of waiting for
    # nodes that had refused to start), or never (a NaN rate)
    argv = [a.replace("MISSING", str(tmp_path / "missing")) for a in argv]
    _refused([*argv, "--out", str(tmp_path / "o")], capsys, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    # the demo wrote its bag and started the graph before the adapter refused the rate
    (["demo", "--learning-rate", "nan"], "--learning-rate: learning_rate must be finite"),
    (["demo", "--learning-rate", "0"], "--learning-rate: learning_rate must be > 0"),
    (["demo", "--frames", "0"], "--frames must be >= 1"),
    # tracebacks from torch: max() of no classes, and an export traced out of memory
    (["bench-exits", "--size", "64", "--num-classes", "0"], "num_classes must be an integer >= 1"),
    (["export-onnx", "--image-size", "100000"], "image size must be at most 1024 px a side"),
])
def test_numbers_torch_or_a_node_would_fail_on_are_refused_first(argv, message, tmp_path,
                                                                  capsys):
    _refused([*argv, "--out", str(tmp_path / "o")], capsys, message)
    assert not (tmp_path / "o").exists()


def _bench_ros_phase(rate_hz_achieved: float, max_pending: int) -> dict:
    return {"rate_hz_achieved": rate_hz_achieved, "classifier_max_pending": max_pending,
            "latency_ms": {"ros_overhead": {"p50": 1.0}},
            "rss": {"classifier": {"growth_mb": 0.5}}}


def test_bench_ros_overload_targets_need_a_rate_above_capacity():
    # --max-rate 50 capped the "overload" phase at 0.3 x the measured capacity, and its
    # bounded queue and flat memory still read as met
    from ttspec_ros.experiments import bench_ros

    nominal = _bench_ros_phase(30.0, 0)
    capped = bench_ros._targets(nominal, _bench_ros_phase(50.0, 1), capacity_hz=160.0)
    assert bench_ros.overload_ratio(_bench_ros_phase(50.0, 1), 160.0) == 50.0 / 160.0
    for key in ("overload_max_pending", "overload_rss_growth_mb"):
        assert capped[key]["met"] is None
        assert capped[key]["reason"].startswith("not overloaded: the phase ran at 50.0 Hz, "
                                                "0.31 x the classifier's measured capacity")
    assert capped["ros_overhead_p50_ms"]["met"] is True  # the nominal phase still counts
    overloaded = bench_ros._targets(nominal, _bench_ros_phase(320.0, 1), capacity_hz=160.0)
    assert overloaded["overload_max_pending"]["met"] is True
    assert overloaded["overload_rss_growth_mb"]["met"] is True
    assert "reason" not in overloaded["overload_max_pending"]
    assert bench_ros._targets(nominal, _bench_ros_phase(320.0, 7),
                              capacity_hz=160.0)["overload_max_pending"]["met"] is False


def test_bench_ros_records_the_overload_rate_cap_and_ratio():
    # settings recorded "overload": 2.0 but not --max-rate, which had capped the phase
    import argparse

    from ttspec_ros.experiments import bench_ros

    parser = argparse.ArgumentParser()
    bench_ros.add_arguments(parser)
    args = parser.parse_args(["--out", "never", "--max-rate", "50"])
    settings = bench_ros._settings(args, 50.0, _bench_ros_phase(49.5, 1), 160.0)
    assert settings["overload"] == 2.0 and settings["max_rate"] == 50.0
    assert settings["overload_rate_hz"] == 50.0
    assert settings["overload_ratio_achieved"] == round(49.5 / 160.0, 3)
    skipped = bench_ros._settings(args, None, None, None)  # --seconds 0: no overload phase
    assert skipped["overload_rate_hz"] is None and skipped["overload_ratio_achieved"] is None


def test_bench_ros_node_means_are_null_when_not_reported():
    # a node without the diagnostic put NaN into bench_ros.json, which is not JSON
    from ttspec_ros.experiments import bench_ros

    assert bench_ros._reported({"mean_handling_ms": "2.5"}, "mean_handling_ms") == 2.5
    for values in ({}, {"mean_handling_ms": "nan"}, {"mean_handling_ms": "-"}):
        assert bench_ros._reported(values, "mean_handling_ms") is None


def test_a_results_directory_gets_the_command_line_and_code_hash(tmp_path):
    import json

    out = tmp_path / "bench"
    argv = ["bench-exits", "--out", str(out), "--arch", "revcol_tiny", "--size", "32",
            "--repeats", "2", "--warmup", "0"]
    assert cli.main(argv) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["command"] == ["ttspec", *argv]
    assert provenance["code_sha256"] == cli.code_hash() and len(cli.code_hash()) == 64
    assert provenance["started"] <= provenance["finished"]
    (out / "provenance.json").unlink()
    (out / "provenance.json").mkdir()  # cannot be written: the finished command still is 0
    assert cli.main(argv) == 0
    refused = tmp_path / "refused"
    assert cli.main(["bench-exits", "--out", str(refused), "--repeats", "1"]) == 2
    assert not (refused / "provenance.json").exists()


def test_ros_measurements_name_the_node_processes_that_did_not_run_through():
    """ttt-ros and bench-ros exit 1 with these (a run whose adapter died was reported as
    that strategy's result, exit 0)."""
    from ttspec_ros.nodes.probe import process_problems

    assert process_problems({"camera": True, "adapter": True}, {"camera": 0, "adapter": 0}) == []
    # a node dead before the end is named once (its exit code follows from its death)
    assert process_problems({"camera": True, "adapter": False},
                            {"camera": 0, "adapter": -9}) == ["adapter was not running at the end"]
    assert process_problems({"classifier": True}, {"classifier": 1}) == [
        "classifier exited with 1"]
