"""benchmarks/report.py: docs/benchmarks.md's generated blocks are what the stored results in
benchmarks/results/ render, and --check says so (exit 0) or shows the difference (exit 1)."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
DOCS = REPO_ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(BENCHMARKS))

import bench_record  # noqa: E402
import report  # noqa: E402

FORWARD_RESULT = {"preset": "paper", "device": "cpu", "threads": 2, "batch_size": 16, "repeats": 7,
                  "parameters": 33363134, "state_dict_entries": 2016, "groups_per_scale": [10, 5],
                  "forward_median_s": 0.8125, "forward_min_s": 0.7125}


def _report(*argv: str) -> subprocess.CompletedProcess:
    """report.py in this process (its imports of the benchmark scripts are then made once)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = report.main(list(argv))
    return subprocess.CompletedProcess(["report.py", *argv], status, out.getvalue(), err.getvalue())


@pytest.fixture
def copies(tmp_path):
    """(docs copy, results copy) with a stored forward_speed result, rendered and checked once."""
    docs, results = tmp_path / "benchmarks.md", tmp_path / "results"
    shutil.copy(DOCS, docs)
    if bench_record.RESULTS_DIR.is_dir():
        shutil.copytree(bench_record.RESULTS_DIR, results)
    results.mkdir(exist_ok=True)
    record = bench_record.record("forward_speed", FORWARD_RESULT, "cpu", argv=["--repeats", "7"])
    (results / "forward_speed.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    done = _report("--docs", str(docs), "--results", str(results))
    assert done.returncode == 0, done.stderr
    assert "0.812 s" in docs.read_text()
    return docs, results


def test_the_committed_docs_match_the_committed_results():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_rendered_copy_passes_the_check(copies):
    docs, results = copies
    done = _report("--docs", str(docs), "--results", str(results), "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_number_changed_in_the_docs_fails_the_check_with_a_diff(copies):
    docs, results = copies
    docs.write_text(docs.read_text().replace("median 0.812 s", "median 0.612 s"))
    done = _report("--docs", str(docs), "--results", str(results), "--check")
    assert done.returncode == 1
    assert "-Preset `paper`" in done.stdout and "median 0.612 s" in done.stdout, done.stdout
    assert "+Preset `paper`" in done.stdout and "median 0.812 s" in done.stdout, done.stdout


def test_a_number_changed_in_a_stored_result_fails_the_check(copies):
    docs, results = copies
    stored = results / "forward_speed.json"
    record = json.loads(stored.read_text())
    record["result"]["forward_median_s"] = 0.9125
    stored.write_text(json.dumps(record))
    done = _report("--docs", str(docs), "--results", str(results), "--check")
    assert done.returncode == 1 and "median 0.912 s" in done.stdout, done.stdout


def test_a_missing_result_renders_the_not_measured_line(tmp_path):
    block = report.render_block("large_ensemble", tmp_path)
    assert block == "Not measured: run `python benchmarks/large_ensemble.py`.\n"
    text = "# t\n<!-- report:large_ensemble -->\nold figures\n<!-- /report:large_ensemble -->\n"
    rendered = report.rendered_document(text, tmp_path)
    assert "old figures" not in rendered and "Not measured: run `python benchmarks/large_ensemble.py`." in rendered


def test_every_block_of_the_docs_is_known_and_every_benchmark_has_a_block():
    names = [match.group(2) for line in DOCS.read_text().splitlines() if (match := report.BLOCK.match(line))]
    opened = names[::2]
    assert set(opened) <= set(report.BLOCKS) and len(opened) == len(set(opened))
    assert set(report.BLOCKS) - set(opened) == set()


def test_a_header_names_command_machine_commit_and_uncommitted_changes():
    record = bench_record.record("forward_speed", FORWARD_RESULT, "cpu", argv=["--repeats", "7"])
    record.update(commit="0123456789ab", dirty=True)
    text = report.header(record)
    assert "`python benchmarks/forward_speed.py --repeats 7`" in text
    assert "0123456789ab with uncommitted changes" in text and record["date"] in text
    assert f"torch {record['machine']['torch']}" in text and "load average" in text


def test_a_script_without_render_markdown_is_named_without_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "eval_speed.py").write_text("VALUE = 1\n")
    monkeypatch.setattr(report, "BENCHMARKS_DIR", tmp_path / "scripts")
    monkeypatch.delitem(sys.modules, "benchmark_eval_speed", raising=False)
    results = tmp_path / "results"
    results.mkdir()
    (results / "eval_speed.json").write_text(json.dumps({"result": {}}))
    docs = tmp_path / "b.md"
    docs.write_text("<!-- report:eval_speed -->\n<!-- /report:eval_speed -->\n")
    assert report.main(["--docs", str(docs), "--results", str(results), "--check"]) == report.EXIT_CANNOT_RENDER
    err = capsys.readouterr().err
    assert "benchmarks/eval_speed.py has no render_markdown(record) function yet" in err
    assert "Traceback" not in err
    monkeypatch.delitem(sys.modules, "benchmark_eval_speed", raising=False)


def test_unbalanced_markers_are_refused(tmp_path):
    with pytest.raises(report.CannotRender, match="never closed"):
        report.rendered_document("<!-- report:cpu_layout -->\ntext\n", tmp_path)
    with pytest.raises(report.CannotRender, match="unknown block report:nothing"):
        report.rendered_document("<!-- report:nothing -->\n<!-- /report:nothing -->\n", tmp_path)
