"""The shipped ensemble in models/: one decoder to the bit, and a plain miselbo_eval.py works on it."""
import json
import math
from pathlib import Path

import torch

from miselbo.storage.checkpoints import load_nvae_checkpoint
from miselbo.evaluation.members import discover_demo_ensemble
from miselbo.evaluation.evaluate import main as evaluate_main
from miselbo.nvae.model import is_decoder_key

DEMO = Path(__file__).resolve().parents[1] / "models" / "mnist5k_demo"


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
