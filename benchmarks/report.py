"""Render docs/benchmarks.md's generated parts from the stored results in benchmarks/results/.

docs/benchmarks.md is hand-written prose with generated blocks: each block sits between a line
`<!-- report:NAME -->` and a line `<!-- /report:NAME -->`, where NAME is one of BLOCKS below. A
block is rendered from benchmarks/results/NAME.json: a header (command, machine, commit, date),
then the body the benchmark script itself renders with its `render_markdown(record) -> str`
(the script is imported by file path). Without a results file the block is one line saying the
benchmark was not measured and which command measures it.

    python benchmarks/report.py             # rewrite the blocks of docs/benchmarks.md
    python benchmarks/report.py --check     # exit 1 with a unified diff when the file differs
    python benchmarks/report.py --docs PATH --results DIR [--check]

Exit status: 0 done (or, with --check, the file matches); 1 --check found a difference; 2 a
block could not be rendered (unknown block name, unbalanced markers, a script without
render_markdown, a record it cannot read), said in one line.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_RESULTS = BENCHMARKS_DIR / "results"
EXIT_DIFFERS, EXIT_CANNOT_RENDER = 1, 2
BLOCK = re.compile(r"^<!-- (/?)report:([A-Za-z0-9_]+) -->$")


@dataclass(frozen=True)
class Block:
    script: str  # the benchmark script that renders it, in benchmarks/
    command: str  # what measures it (said when its results file is missing)


BLOCKS = {
    "train_speed": Block("train_speed.py", "python benchmarks/train_speed.py"),
    "train_speed_precision": Block("train_speed.py", "python benchmarks/train_speed.py --precision fp32,bf16"),
    "eval_speed": Block("eval_speed.py", "python benchmarks/eval_speed.py"),
    "eval_speed_quick": Block("eval_speed.py", "python benchmarks/eval_speed.py --quick"),
    "forward_speed": Block("forward_speed.py", "python benchmarks/forward_speed.py"),
    "large_ensemble": Block("large_ensemble.py", "python benchmarks/large_ensemble.py"),
    "cpu_layout": Block("cpu_layout.py", "python benchmarks/cpu_layout.py"),
    "main_job": Block("main_job.py", "python benchmarks/main_job.py"),
    "joint_comparison": Block("joint_comparison.py", "python benchmarks/joint_comparison.py"),
    "joint_comparison_quick": Block("joint_comparison.py", "python benchmarks/joint_comparison.py --quick"),
}


class CannotRender(Exception):
    """A block that cannot be rendered; the message says which and why."""


def not_measured_line(name: str) -> str:
    return f"Not measured: run `{BLOCKS[name].command}`.\n"


def machine_line(machine: dict) -> str:
    """CPU model, cores, torch threads, torch version, device and the load average at the end."""
    device = machine.get("device", "?")
    if machine.get("gpu"):
        device = f"{device} ({machine['gpu']})"
    load = machine.get("load_average")
    load_text = " / ".join(f"{value:.2f}" for value in load) if load else "unknown"
    memory = f", {machine['memory_gib']} GiB" if machine.get("memory_gib") else ""
    return (f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores{memory}, "
            f"{machine.get('torch_threads', '?')} torch threads, torch {machine.get('torch', '?')}, "
            f"device {device}; load average (1, 5, 15 min) at the end {load_text}")


def header(record: dict) -> str:
    """The lines every rendered block starts with."""
    commit = record.get("commit") or "unknown"
    if record.get("dirty"):
        commit += " with uncommitted changes"
    return (f"- command: `{record.get('command', '?')}`\n"
            f"- machine: {machine_line(record.get('machine') or {})}\n"
            f"- commit: {commit}; date: {record.get('date', '?')}\n")


def load_script(script: str):
    """Import benchmarks/<script> by file path (once)."""
    name = f"benchmark_{Path(script).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS_DIR / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a broken script must not end the report with a traceback
        del sys.modules[name]
        raise CannotRender(f"benchmarks/{script} cannot be imported: {type(error).__name__}: {error}") from None
    return module


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CannotRender(f"{path} cannot be read as JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        raise CannotRender(f"{path} is no stored benchmark record (no 'result' object)")
    return record


def render_block(name: str, results_dir: Path) -> str:
    """The text between a block's markers: its header and body, or the not-measured line."""
    if name not in BLOCKS:
        raise CannotRender(f"unknown block report:{name}; the known ones are {', '.join(BLOCKS)}")
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return not_measured_line(name)
    script = BLOCKS[name].script
    render = getattr(load_script(script), "render_markdown", None)
    if render is None:
        raise CannotRender(f"benchmarks/{script} has no render_markdown(record) function yet, so "
                           f"{path.name} cannot be rendered")
    record = read_record(path)
    try:
        body = render(record)
    except Exception as error:  # an older or damaged record: say which, no traceback
        raise CannotRender(f"benchmarks/{script} render_markdown failed on {path}: "
                           f"{type(error).__name__}: {error}") from None
    return header(record) + "\n" + body.rstrip("\n") + "\n"


def rendered_document(text: str, results_dir: Path) -> str:
    """`text` with every generated block replaced by its rendering from `results_dir`."""
    out, open_name = [], None
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        match = BLOCK.match(line.rstrip("\n"))
        if match is None:
            if open_name is None:
                out.append(line)
            continue
        closing, name = match.group(1) == "/", match.group(2)
        if closing != (open_name is not None) or (closing and name != open_name):
            raise CannotRender(f"line {number}: unbalanced marker {line.strip()}")
        out.append(line)
        if not closing:
            out += ["\n", render_block(name, results_dir), "\n"]
        open_name = None if closing else name
    if open_name is not None:
        raise CannotRender(f"report:{open_name} is never closed")
    return "".join(out)


def unified_diff(current: str, rendered: str, path: Path) -> str:
    return "".join(difflib.unified_diff(current.splitlines(keepends=True), rendered.splitlines(keepends=True),
                                        f"{path} (as it is)", f"{path} (rendered from the stored results)"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff when the docs differ")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="the Markdown file (docs/benchmarks.md)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the stored results folder")
    options = parser.parse_args(argv)
    try:
        current = options.docs.read_text(encoding="utf-8")
        rendered = rendered_document(current, options.results)
    except (CannotRender, OSError) as error:
        print(f"report.py: {error}", file=sys.stderr)
        return EXIT_CANNOT_RENDER
    if options.check:
        if rendered == current:
            print(f"{options.docs} matches the stored results in {options.results}")
            return 0
        print(unified_diff(current, rendered, options.docs), end="")
        print(f"report.py: {options.docs} differs from what the stored results render; "
              "run python benchmarks/report.py", file=sys.stderr)
        return EXIT_DIFFERS
    if rendered != current:
        options.docs.write_text(rendered, encoding="utf-8")
    print(f"{options.docs} rendered from {options.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
