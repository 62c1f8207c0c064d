"""`python -m benchmarks [--quick] [--only NAME,...] [--out DIR] [--write-benchmarks-md]`:
run the groups, print the Markdown table, and write benchmarks.md and benchmarks.json
into DIR (default bench-results/)."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import GROUPS
from benchmarks.common import REPO_ROOT, Context, Figure, log, machine
from benchmarks.report import as_json, markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure mnist-track against same-run references and write a report.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="quick estimates: under 2 minutes in all"
    )
    parser.add_argument(
        "--only", help=f"comma-separated groups to run (default: all): {','.join(GROUPS)}"
    )
    parser.add_argument("--out", default="bench-results", help="output folder [bench-results]")
    parser.add_argument(
        "--write-benchmarks-md",
        action="store_true",
        help=f"also write {REPO_ROOT / 'BENCHMARKS.md'}",
    )
    args = parser.parse_args(argv)
    args.groups = GROUPS
    if args.only:
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(GROUPS))
        if unknown:
            parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
        args.groups = tuple(name for name in GROUPS if name in wanted)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = Context(quick=args.quick)
    started = time.perf_counter()
    result = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "groups": list(args.groups),
        "machine": machine(context),
        "group_seconds": {},
        "errors": {},
    }
    figures: list[Figure] = []
    for name in args.groups:
        log(f"== {name}")
        group_started = time.perf_counter()
        try:
            figures += importlib.import_module(f"benchmarks.{name}").run(context)
        except Exception as error:  # noqa: BLE001 - one broken group must not hide the rest
            traceback.print_exc()
            result["errors"][name] = f"{type(error).__name__}: {error}"
        result["group_seconds"][name] = round(time.perf_counter() - group_started, 1)
    result["seconds"] = time.perf_counter() - started
    text = markdown(result, figures)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.md").write_text(text)
    (out / "benchmarks.json").write_text(as_json(result, figures))
    if args.write_benchmarks_md:
        (REPO_ROOT / "BENCHMARKS.md").write_text(text)
    print(text)
    log(f"wrote {out / 'benchmarks.md'} and {out / 'benchmarks.json'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
