"""Turn benchmark JSON files (tools/bench/*.py --json) into one dated markdown section and append it to docs/PERF.md.

The section names the date, the device, the versions (torch, CUDA, megatron-core, Python), the command that
produced the figures, then one table per benchmark with its notes. Nothing in the file is rewritten: each run adds
a section at the end, so figures from different machines and versions stay side by side.

    python tools/bench/perf_report.py runs/bench/*.json [--append docs/PERF.md] [--date 2026-11-22]
                                      [--command "make bench"] [--note "tests/gpu: 31 passed"] [--save-json run.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import format_value  # noqa: E402

REQUIRED = ("benchmark", "title", "env", "columns", "rows")


def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    missing = [k for k in REQUIRED if k not in res] if isinstance(res, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"{path}: not a tools/bench result (missing {missing})")
    return res


def table(res: dict) -> str:
    columns = res["columns"]
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in res["rows"]:
        lines.append("| " + " | ".join(format_value(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def _environment_line(env: dict) -> str:
    cuda = env.get("cuda") or "none"
    return (f"torch {env.get('torch')}, CUDA {cuda}, megatron-core {env.get('megatron_core')}, "
            f"Python {env.get('python')}; torch threads: {env.get('threads')}")


def section(results: list[dict], date: str, command: str, notes: list[str] = ()) -> str:
    """The markdown section for one run of the benchmarks; `notes` go under the versions (e.g. test outcomes)."""
    if not results:
        raise ValueError("no benchmark results to report")
    devices = list(dict.fromkeys(r["env"].get("device", "unknown device") for r in results))
    envs = list(dict.fromkeys(_environment_line(r["env"]) for r in results))
    out = [f"## {date}: {', '.join(devices)}", ""]
    out += [f"- {line}" for line in envs]
    out += [f"- command: `{command}`"] + [f"- {note}" for note in notes] + [""]
    for res in results:
        out += [f"### {res['benchmark']}", "", res["title"], "", table(res), ""]
        out += [f"- {note}" for note in res.get("notes", [])]
        if res.get("notes"):
            out.append("")
    return "\n".join(out)


def append(path: str, text: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: sections are appended to the repository's docs/PERF.md")
    with open(path) as f:
        existing = f.read()
    with open(path, "a") as f:
        f.write(("" if existing.endswith("\n\n") else "\n" if existing.endswith("\n") else "\n\n") + text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by the benchmarks' --json")
    parser.add_argument("--append", metavar="PERF_MD", help="append the section to this file (else print it)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--command", default="make bench", help="the command that produced the figures")
    parser.add_argument("--note", action="append", default=[], help="a line for the section's header (repeatable)")
    parser.add_argument("--save-json", metavar="PATH", help="also write the whole run (results and notes) as one JSON")
    args = parser.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        raise SystemExit(f"--date {args.date!r} is not YYYY-MM-DD")
    results = [load(p) for p in args.results]
    text = section(results, args.date, args.command, args.note)
    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump({"date": args.date, "command": args.command, "notes": args.note, "results": results}, f,
                      indent=2)
    if args.append:
        append(args.append, text)
        print(f"appended a {args.date} section to {args.append}")
    else:
        print(text)


if __name__ == "__main__":
    main()
