"""The ``ttspec`` command: one subcommand per module, imported only when it runs.

Each module named in COMMANDS provides ``add_arguments(parser)`` and ``run(args) -> int``
and a one-line module docstring used as the subcommand's help. A command refuses a bad option
or input (a missing or corrupt model, an unwritable --out) by raising ValueError or OSError
with a message naming it, before it writes anything; ``main`` prints that message on one line
and exits 2, as argparse does for its own errors.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

COMMANDS: dict[str, str] = {
    # replay evaluation
    "demo": "ttspec_ros.experiments.demo",
    "make-bag": "ttspec_ros.experiments.make_bag",
    "replay": "ttspec_ros.experiments.replay_cmd",
    # model and cascade
    "train": "ttspec_ros.train",
    "eval-exits": "ttspec_ros.experiments.table1",
    "bench-exits": "ttspec_ros.experiments.bench_exits",
    "import-checkpoint": "ttspec_ros.import_checkpoint",
    # test-time specialization
    "bench-update": "ttspec_ros.experiments.bench_update",
    "specialize-experiment": "ttspec_ros.experiments.specialize_experiment",
    "forgetting-experiment": "ttspec_ros.experiments.forgetting_experiment",
    "make-anchors": "ttspec_ros.experiments.make_anchors",
    # test-time training
    "make-corrupted": "ttspec_ros.experiments.make_corrupted",
    "ttt-experiment": "ttspec_ros.experiments.ttt_experiment",
    "ttt-ros": "ttspec_ros.experiments.ttt_ros",
    # ROS graph and inference backends
    "bench-ros": "ttspec_ros.experiments.bench_ros",
    "export-onnx": "ttspec_ros.experiments.export_onnx",
    "bench-backends": "ttspec_ros.experiments.bench_backends",
}


def _summary(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return ""
    import ast

    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ttspec", description=__doc__.splitlines()[0])
    from ttspec_ros import __version__

    parser.add_argument("--version", action="version", version=f"ttspec_ros {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Build every subparser cheaply from docstrings; import only the chosen module.
    for name, module_name in COMMANDS.items():
        sub.add_parser(name, help=_summary(module_name), add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    cmd = argparse.ArgumentParser(prog=f"ttspec {argv[0]}", description=module.__doc__)
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    started = time.time()
    try:
        status = int(module.run(args) or 0)
    except (OSError, ValueError) as err:  # the refusal of bad input; a traceback would bury it
        print(f"ttspec {argv[0]}: {err}", file=sys.stderr)
        return 2
    if status == 0:
        try:
            _write_provenance(argv, args, started)
        except OSError as err:  # the results are written: the command did its work
            print(f"ttspec {argv[0]}: results written, provenance.json not: {err}",
                  file=sys.stderr)
    return status


# --out of these is not a results directory (a bag: only rosbag2's files belong in it)
NO_PROVENANCE = ("make-bag",)


def _write_provenance(argv: list[str], args: argparse.Namespace, started: float) -> None:
    """``provenance.json`` beside a command's results: the command line, the package release
    and a hash of its code (the installed copy has no git history), and the run's times. The
    results JSON record their seeds and settings; this records what made them."""
    out = getattr(args, "out", None)
    if argv[0] in NO_PROVENANCE or not out or not Path(out).is_dir():
        return
    from ttspec_ros import __version__
    from ttspec_ros.files import write_json

    torch = sys.modules.get("torch")
    write_json(Path(out) / "provenance.json", {
        "command": ["ttspec", *argv], "ttspec_ros": __version__, "code_sha256": code_hash(),
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "started": _iso(started), "finished": _iso(time.time()),
    })


def code_hash() -> str:
    """sha256 over the package's Python files (relative path and bytes, sorted by path)."""
    from ttspec_ros.files import tree_sha256

    package = Path(__file__).resolve().parent
    return tree_sha256(package, sorted(p.relative_to(package).as_posix()
                                       for p in package.rglob("*.py")))


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
