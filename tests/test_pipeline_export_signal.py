"""SIGTERM/SIGINT during the main job's export: answered at once, exit 143/130, no stale manifest."""
import dataclasses
import json
import os
import signal

import pytest

from miselbo.pipeline import run as pipeline
from miselbo.pipeline import export as pipeline_export
from miselbo.storage.checkpoints import read_checkpoint



def _settings(tmp_path, sources):
    """The pipeline's settings for a run folder with an evaluation's results.json, its members
    pointing at real checkpoints."""
    out = tmp_path / "run"
    (out / "results").mkdir(parents=True)
    estimators = {name: {"mean": -100.0 - index, "stderr": 0.5, "nll_nats": 100.0 + index, "nll_bpd": 0.18}
                  for index, name in enumerate(("miselbo", "pooled", "avg_iwelbo", "avg_elbo"))}
    results = {"S": len(sources), "L": 2, "num_examples": 4, "split": "test", "dataset": "mnist5k", "seed": 0,
               "device": "cpu", "wall_seconds": 1.0, "batch_size": 4, "chunk_size": 2, "estimators": estimators}
    (out / "results" / "results.json").write_text(json.dumps(results))
    settings = pipeline.parse_settings(["--out", str(out), "--export", str(tmp_path / "export")])

    class GivenMembers(type(settings)):
        def member_names(self):
            return [f"m{i}" for i in range(1, len(sources) + 1)]

        def member_checkpoints(self):
            return list(sources)
    return GivenMembers(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)})


@pytest.fixture
def shipped_members():
    root = pipeline.Path(__file__).resolve().parents[1] / "models" / "mnist5k_demo"
    return [root / name / "checkpoint.pt" for name in ("p_and_q1", "q2", "q3")]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_export_stops_it_and_leaves_no_manifest(tmp_path, shipped_members, monkeypatch,
                                                                capsys, signal_number):
    settings = _settings(tmp_path, shipped_members)
    settings.export.mkdir()
    (settings.export / "manifest.json").write_text("{}")  # an earlier export's manifest
    real_export = pipeline_export.export_for_evaluation
    calls = []

    def export_then_signal(source, destination):
        calls.append(source)
        checkpoint = real_export(source, destination)
        if len(calls) == 2:
            os.kill(os.getpid(), signal_number)
        return checkpoint

    monkeypatch.setattr(pipeline_export, "export_for_evaluation", export_then_signal)
    assert pipeline.export_stoppable(settings) == 128 + signal_number
    assert len(calls) == 2  # stopped right after the second member, the third was never started
    assert not (settings.export / "manifest.json").exists()
    assert read_checkpoint(settings.export / "m2" / "checkpoint.pt")["optimizer"] is None
    assert not (settings.export / "m3").exists()
    message = capsys.readouterr().err
    assert signal.Signals(signal_number).name in message and "no manifest.json" in message
    # the default handlers are back once the export is over
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_uninterrupted_export_writes_the_manifest(tmp_path, shipped_members):
    settings = _settings(tmp_path, shipped_members)
    assert pipeline.export_stoppable(settings) == 0
    manifest = json.loads((settings.export / "manifest.json").read_text())
    assert manifest["checkpoints"] == ["m1/checkpoint.pt", "m2/checkpoint.pt", "m3/checkpoint.pt"]
    assert manifest["eval_defaults"] == {"num_iw_samples": 2, "batch_size": 4, "chunk_size": 2}
    assert "-100.0000" in (settings.export / "README.md").read_text()  # the table, rendered
