"""examples/own_model.py end to end on a tiny setting: the CLI, its table, its PNG, its numbers."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "own_model.py"
TINY = ["--S", "3", "--L", "1", "20", "--steps", "150", "--reps", "30", "--seed", "1"]


def run_example(args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=300
    )


def parse_rows(stdout):
    """L -> {column: mean} from the printed table."""
    lines = stdout.splitlines()
    header = next(line for line in lines if line.strip().startswith("L |"))
    columns = [cell.strip() for cell in header.split("|")][1:]
    rows = {}
    for line in lines[lines.index(header) + 2:]:
        if not re.match(r"^\s+\d+ \|", line):
            break
        cells = [cell.strip() for cell in line.split("|")]
        rows[int(cells[0])] = {name: float(cell.split("+-")[0]) for name, cell in zip(columns, cells[1:])}
    return rows


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_the_png(tmp_path):
    out = tmp_path / "ensemble.png"
    result = run_example([*TINY, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = parse_rows(result.stdout)
    assert sorted(rows) == [1, 20]
    for row in rows.values():
        assert row["log Z"] == pytest.approx(math.log(3.5), abs=1e-4)
        assert row["pooled"] >= row["MISELBO"]  # holds per replication, so for the means too
        assert row["avg IWELBO"] >= row["avg ELBO"] - 1e-4
        assert -0.05 <= row["JSD"] <= math.log(3) + 1e-4
    assert rows[1]["MISELBO"] == pytest.approx(rows[1]["avg ELBO"] + rows[1]["JSD"], abs=2e-4)  # L = 1


def test_cli_rejects_bad_flags():
    result = run_example(["--S", "0"])
    assert result.returncode == 2
    assert "--S must be >= 1; got 0" in result.stderr


@pytest.mark.slow
def test_bounds_sit_below_the_true_log_z(tmp_path):
    spec = importlib.util.spec_from_file_location("own_model", EXAMPLE)
    own_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(own_model)
    results = own_model.main([*TINY, "--out", str(tmp_path / "plot.png")])
    for num_samples, values in results.items():
        for name in ("avg ELBO", "MISELBO", "pooled", "avg IWELBO"):
            replicated = values[name]
            stderr = replicated.std().item() / math.sqrt(len(replicated))
            assert replicated.mean().item() <= own_model.LOG_Z + 4 * stderr, (num_samples, name)
        assert (values["pooled"] >= values["MISELBO"]).all()
