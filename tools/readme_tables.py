"""Render the README's reference tables from the code that defines them (ttspec_ros.topics,
ttspec_ros.params, ttspec_ros.cli, msg/), so the README cannot drift from the code.

    .venv/bin/python tools/readme_tables.py          # rewrite README.md between the markers
    .venv/bin/python tools/readme_tables.py --check  # exit 1 if README.md is stale (tested)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ttspec_ros import cli, params, topics  # noqa: E402

BEGIN = "<!-- BEGIN GENERATED TABLES (tools/readme_tables.py) -->"
END = "<!-- END GENERATED TABLES -->"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _default(s: params.ParamSpec) -> str:
    if s.default is params.FROM_MODEL_CARD:
        return "(model card)"
    if s.type == "bool":
        return f"`{str(s.default).lower()}`"
    return f"`{s.default!r}`" if s.type == "string" else f"`{s.default}`"


def _range(s: params.ParamSpec) -> str:
    parts = []
    if s.choices:
        parts.append(" / ".join(s.choices))
    if s.min is not None or s.max is not None:
        parts.append(f"[{s.min}, {s.max}]")
    if s.constraints:
        parts.append(s.constraints)
    if s.read_only:
        parts.append("read-only")
    return "; ".join(parts)


def render() -> str:
    out = ["### Executables (`lib/ttspec_ros`)", "", _row("executable", "node name"),
           _row("---", "---")]
    out += [_row(f"`{exe}`", f"`{node}`") for node, exe in topics.EXECUTABLES.items()]
    out += ["", "### Topics", "", _row("topic", "type", "publisher", "subscribers", "QoS",
                                       "what"), _row(*["---"] * 6)]
    for t in topics.TOPICS:
        out.append(_row(f"`{t.name}`", f"`{t.type}`", ", ".join(t.publishers),
                        ", ".join(t.subscribers), t.qos, t.description))
    out += ["", "### Services", "", _row("service", "type", "node", "what"),
            _row(*["---"] * 4)]
    for name, what in topics.SERVICES.items():
        out.append(_row(f"`{name}`", "`std_srvs/Trigger`", topics.ADAPTER_NODE, what))
    out += ["", "### Parameters", "",
            "All settable live through `/<ns>/<node>/set_parameters` (e.g. `ros2 param set`) "
            "unless read-only; invalid values are refused with a reason and change nothing.", "",
            _row("node", "parameter", "type", "default", "range", "description"),
            _row(*["---"] * 6)]
    for node, specs in params.NODE_PARAMS.items():
        for s in specs:
            out.append(_row(node, f"`{s.name}`", s.type, _default(s), _range(s), s.description))
    out += ["", "### Messages (`msg/`)", "", _row("message", "fields"), _row("---", "---")]
    for path in sorted((REPO / "msg").glob("*.msg")):
        fields = [line.split("#")[0].split() for line in path.read_text().splitlines()]
        fields = [f"{f[1]} ({f[0]})" for f in fields if len(f) >= 2]
        out.append(_row(f"`ttspec_ros/{path.stem}`", ", ".join(fields)))
    out += ["", "### `ttspec` commands", "", _row("command", "what"), _row("---", "---")]
    for name, module in cli.COMMANDS.items():
        out.append(_row(f"`ttspec {name}`", cli._summary(module)))
    return "\n".join(out)


def updated(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    path = REPO / "README.md"
    current = path.read_text(encoding="utf-8")
    new = updated(current)
    if args.check:
        if new != current:
            print("README.md tables are stale: run tools/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
