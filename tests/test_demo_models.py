"""The shipped ensemble in models/: one decoder to the bit, a plain miselbo_eval.py works on it, its
table on a fixed subset is pinned, and its folder's README shows what a plain evaluation prints.

Regenerate the pinned values after a change that is meant to move them (a new export, a new
sampling scheme): `python tests/test_demo_models.py --pin`, and say why in the commit.
"""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from miselbo.storage.checkpoints import load_nvae_checkpoint
from miselbo.evaluation.members import discover_demo_ensemble
from miselbo.evaluation.evaluate import main as evaluate_main
from miselbo.nvae.model import is_decoder_key

DEMO = Path(__file__).resolve().parents[1] / "models" / "mnist5k_demo"
PINNED = Path(__file__).resolve().parent / "pinned" / "mnist5k_demo_subset.json"
# A plain evaluation of a fixed subset with a fixed seed; only float rounding may move it (other
# CPUs, thread counts and BLAS builds change the last digits of float32 sums, far below this).
PINNED_ARGV = ["--num_examples", "50", "--num_iw_samples", "5", "--seed", "0"]
PINNED_TOLERANCE_NATS = 5e-3


def test_shipped_members_share_every_decoder_tensor_and_differ_in_the_encoder():
    paths = discover_demo_ensemble()
    assert [path.parent.name for path in paths] == ["p_and_q1", "q2", "q3"]
    loaded = [load_nvae_checkpoint(path) for path in paths]
    states = [model.state_dict() for model, _, _ in loaded]
    fingerprints = {checkpoint["miselbo"]["decoder_fingerprint"] for _, _, checkpoint in loaded}
    assert fingerprints == {loaded[0][0].decoder_fingerprint()}
    decoder_keys = [key for key in states[0] if is_decoder_key(key)]
    for key in decoder_keys:
        for state in states[1:]:
            assert torch.equal(states[0][key], state[key]), key
    encoder_keys = [k for k in states[0] if not is_decoder_key(k) and states[0][k].is_floating_point()]
    assert not all(torch.equal(states[0][k], states[1][k]) for k in encoder_keys)
    assert sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file()) < 15e6


def test_plain_evaluation_of_the_shipped_ensemble(tmp_path):
    assert evaluate_main(["--num_examples", "20", "--num_iw_samples", "4", "--save", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    estimators = results["estimators"]
    assert results["S"] == 3 and results["dataset"] == "mnist5k"
    assert estimators["pooled"]["mean"] >= estimators["miselbo"]["mean"]
    assert 0.0 <= estimators["jsd"]["mean"] <= math.log(3)
    assert -200.0 < estimators["miselbo"]["mean"] < -50.0  # a trained model, in nats per digit
    delta = estimators["miselbo"]["mean"] - estimators["avg_iwelbo"]["mean"]
    assert math.isclose(results["delta"], delta, rel_tol=1e-9, abs_tol=1e-9)


def _table(results: dict) -> dict:
    """{row name: mean} of a results.json: every estimator and each member's IWELBO."""
    table = {name: entry["mean"] for name, entry in results["estimators"].items()}
    table.update({f"iwelbo q{i + 1}": value for i, value in enumerate(results["iwelbo_per_member"])})
    return table


def _evaluate_subset(save: Path) -> dict:
    assert evaluate_main([*PINNED_ARGV, "--save", str(save)]) == 0
    return _table(json.loads((save / "results.json").read_text()))


def test_the_shipped_table_on_a_fixed_subset_and_seed_is_pinned(tmp_path):
    pinned = json.loads(PINNED.read_text())
    assert pinned["argv"] == PINNED_ARGV
    table = _evaluate_subset(tmp_path)
    assert set(table) == set(pinned["table"])
    for row, value in pinned["table"].items():
        assert abs(table[row] - value) <= PINNED_TOLERANCE_NATS, (row, table[row], value)


def _readme_table() -> dict:
    """{row name: mean} from the table in the folder's README (the export wrote it)."""
    text = (DEMO / "README.md").read_text()
    rows = re.findall(r"^(miselbo|pooled|avg_iwelbo|avg_elbo|jsd|iwelbo q\d+) +(-?\d+\.\d+)", text, re.M)
    return {name: float(value) for name, value in rows}


@pytest.mark.slow
def test_a_plain_evaluation_prints_the_table_of_the_folders_readme(tmp_path):
    # what `python miselbo_eval.py` prints with no arguments: all 1,000 test digits, the manifest's
    # L, batch and chunk size, so the same draws as the main job's evaluation that made the README
    shown = _readme_table()
    assert len(shown) == 8
    assert evaluate_main(["--save", str(tmp_path)]) == 0
    table = _table(json.loads((tmp_path / "results.json").read_text()))
    for row, value in shown.items():
        assert abs(table[row] - value) <= PINNED_TOLERANCE_NATS, (row, table[row], value)


MAIN_JOB_RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "main_job.json"
# The main job and a plain evaluation of its export score the same checkpoints with the same draws
# (manifest batch and chunk size): only float rounding between machines may separate them.
MAIN_JOB_AGREEMENT_NATS = 0.02


def test_the_stored_main_job_printed_the_shipped_ensembles_table():
    record = json.loads(MAIN_JOB_RESULT.read_text())
    evaluation = record["result"]["evaluation"]
    assert not record["result"]["settings"]["quick"] and record["result"]["settings"]["pipeline_flags"] == []
    job = _table(evaluation)  # the stored table has results.json's estimators and member IWELBOs
    shown = _readme_table()
    assert set(shown) <= set(job)
    for row, value in shown.items():
        assert abs(job[row] - value) <= MAIN_JOB_AGREEMENT_NATS, (row, job[row], value)


if __name__ == "__main__" and sys.argv[1:] == ["--pin"]:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps({"argv": PINNED_ARGV, "table": _evaluate_subset(Path(folder))},
                                     indent=2) + "\n")
    print(f"wrote {PINNED}")
