"""miselbo_eval.py / miselbo.evaluation.evaluate: outputs, averaging, determinism, processes, and the clear
errors for bad input (exit status 2, one paragraph, no traceback)."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from matplotlib.image import imread

from conftest import REPO_ROOT
from ensemble_helpers import build_model, make_members, one_torch_thread, save_members  # noqa: F401
from miselbo import estimators as est
from miselbo.storage.checkpoints import save_nvae_checkpoint
from miselbo.errors import UserError
from miselbo.runtime.cli import run_cli
from miselbo.errors import DataError
from miselbo.ensemble.log_weights import Ensemble
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
from miselbo.evaluation.members import discover_demo_ensemble, load_members
from miselbo.evaluation.examples import STREAM_DRAWS, EvaluationExamples
from miselbo.seeding import example_seed
from miselbo.evaluation.shard import FlowInversionError, shard_batches
from miselbo.evaluation.evaluate import (EvalSettings, build_parser, evaluate, main,
                              settings_from_args)
from miselbo.data.datasets import load_dataset
from miselbo.evaluation.report import ValuePlan, summarise

NUM_EXAMPLES, BATCH = 10, 4  # batches of 4, 4, 2: unequal, so per-batch means would differ


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensemble")
    args, models = make_members(3, seed=20)
    paths = save_members(folder, args, models, seed=20)
    (folder / "manifest.json").write_text(json.dumps({"checkpoints": [str(p.relative_to(folder)) for p in paths]}))
    return folder


def _settings(folder, **overrides):
    paths = [str(folder / name) for name in ("p_and_q1", "q2", "q3")]
    values = dict(checkpoints=paths, num_iw_samples=4, dataset="mnist5k", num_examples=NUM_EXAMPLES,
                  batch_size=BATCH, show_progress=False)
    values.update(overrides)
    return EvalSettings(**values)


def _cli(argv, capsys):
    status = run_cli(main, argv, prog="miselbo_eval.py")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------- outputs

@pytest.mark.slow
def test_cli_writes_every_output(ensemble_dir, tmp_path, capsys):
    save = tmp_path / "out"
    status, out, err = _cli(["--checkpoints", str(ensemble_dir), "--num_iw_samples", "6", "--dataset", "mnist5k",
                             "--num_examples", str(NUM_EXAMPLES), "--batch_size", str(BATCH), "--save", str(save),
                             "--ablation", "--L_list", "1", "3", "6", "--estimators", *["miselbo", "pooled",
                             "avg_iwelbo", "iwelbo", "avg_elbo", "jsd", "s2a", "s2s"], "--subset_size", "2",
                             "--time_eval"], capsys)
    assert status == 0, err
    assert "miselbo" in out and "iwelbo q3" in out
    results = json.loads((save / "results.json").read_text())
    for key in ("S", "L", "num_examples", "dataset", "seed", "device", "wall_seconds", "checkpoints", "estimators",
                "iwelbo_per_member", "delta", "timing"):
        assert key in results, key
    assert (results["S"], results["L"], results["num_examples"], results["dataset"]) == (3, 6, NUM_EXAMPLES, "mnist5k")
    assert [set(entry) for entry in results["checkpoints"]] == [{"path", "decoder_fingerprint"}] * 3
    assert len({entry["decoder_fingerprint"] for entry in results["checkpoints"]}) == 1
    assert set(results["estimators"]) == {"miselbo", "pooled", "avg_iwelbo", "avg_elbo", "jsd", "s2a", "s2s"}
    for entry in results["estimators"].values():
        assert set(entry) == {"mean", "stderr", "nll_nats", "nll_bpd"} and entry["stderr"] >= 0
    miselbo = results["estimators"]["miselbo"]
    assert miselbo["nll_nats"] == -miselbo["mean"]
    assert math.isclose(miselbo["nll_bpd"], miselbo["nll_nats"] / (784 * math.log(2)))
    assert math.isclose(results["delta"], miselbo["mean"] - results["estimators"]["avg_iwelbo"]["mean"], abs_tol=1e-9)
    assert math.isclose(sum(results["iwelbo_per_member"]) / 3, results["estimators"]["avg_iwelbo"]["mean"])
    assert results["estimators"]["pooled"]["mean"] >= miselbo["mean"]  # Jensen, on the same samples
    assert 0 <= results["estimators"]["jsd"]["mean"] <= math.log(3) + 1e-9

    rows = (save / "ablation.csv").read_text().splitlines()
    assert rows[0] == "S,L,estimator,mean,stderr,nll_nats,nll_bpd"
    table = {(int(s), int(l), name): float(mean) for s, l, name, mean, *_ in (row.split(",") for row in rows[1:])}
    assert len(table) == 3 * 3 * 6  # 5 estimators and the best member at S' x L' samples (on with --ablation)
    assert len(results["iwelbo_matched_per_member"]) == 3 and "best_member_matched" in results
    assert math.isclose(table[(3, 6, "best_member_matched")], results["best_member_matched"]["mean"])
    assert math.isclose(table[(1, 6, "best_member_matched")], results["iwelbo_per_member"][0])  # S' = 1: L samples
    assert "iwelbo q1@SL" in out and "miselbo - best matched (paired)" in out
    assert math.isclose(table[(3, 6, "miselbo")], miselbo["mean"])  # the full ensemble, all samples
    assert math.isclose(table[(1, 6, "miselbo")], results["iwelbo_per_member"][0])  # S' = 1 is q1's IWELBO
    assert table[(3, 1, "miselbo")] != table[(3, 6, "miselbo")]
    for name in ("ablation.png", "samples.png"):
        image = imread(save / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01


def test_means_weight_every_example_equally(ensemble_dir):
    """Recompute every example's MISELBO with the documented seeding; average over examples."""
    settings = _settings(ensemble_dir, estimators=("miselbo", "avg_iwelbo"))
    results = evaluate(settings)
    members = load_members(settings.checkpoints)
    use_fast_cpu_layout(members.models)  # as evaluate does on CPU (layouts compared in test_ensemble_reduced)
    ensemble = Ensemble(members.models)
    examples = EvaluationExamples(load_dataset("mnist5k", ".", False, NUM_EXAMPLES), "mnist5k", 0, 8)
    per_example = []
    for start in range(0, NUM_EXAMPLES, BATCH):
        x = examples.batch(start, min(start + BATCH, NUM_EXAMPLES))
        generator = torch.Generator().manual_seed(example_seed(0, start, STREAM_DRAWS))
        weights = ensemble.log_weights(x, 4, generator)
        per_example.append(est.miselbo(weights.log_p, weights.log_q))
    values = torch.cat(per_example)
    assert math.isclose(results["estimators"]["miselbo"]["mean"], values.mean().item(), rel_tol=1e-12)
    assert math.isclose(results["estimators"]["miselbo"]["stderr"], values.std().item() / math.sqrt(NUM_EXAMPLES),
                        rel_tol=1e-9)
    batch_means = torch.stack([part.mean() for part in per_example]).mean().item()
    assert not math.isclose(batch_means, values.mean().item(), rel_tol=1e-9)  # the test can tell them apart


def _examples():
    return EvaluationExamples(load_dataset("mnist5k", ".", False, NUM_EXAMPLES), "mnist5k", 0, 8)


def test_matched_baseline_equals_independent_single_member_passes(ensemble_dir):
    """Each member's IWELBO at S x L samples: its L MISELBO samples, then (S - 1) x L more drawn by
    single-member ensembles from the same generator; the paired differences by direct computation."""
    settings = _settings(ensemble_dir, matched_baseline=True, chunk_size=2)
    results = evaluate(settings)
    models = load_members(settings.checkpoints).models
    use_fast_cpu_layout(models)  # as evaluate does on CPU
    examples = _examples()
    matched, miselbo, pooled = [], [], []
    for start in range(0, NUM_EXAMPLES, BATCH):
        x = examples.batch(start, min(start + BATCH, NUM_EXAMPLES))
        generator = torch.Generator().manual_seed(example_seed(0, start, STREAM_DRAWS))
        full = Ensemble(models).log_weights(x, 4, generator, chunk_size=2)
        own = full.log_p - torch.diagonal(full.log_q, dim1=1, dim2=3).transpose(1, 2)  # [B, S, L]
        extra = []
        for model in models:
            alone = Ensemble([model]).log_weights(x, 2 * 4, generator, chunk_size=2)
            extra.append(alone.log_p[:, 0] - alone.log_q[:, 0, :, 0])  # [B, (S - 1) L]
        log_w = torch.cat([own, torch.stack(extra, dim=1)], dim=-1)  # [B, S, S L]
        matched.append(torch.logsumexp(log_w, dim=-1) - math.log(12))
        miselbo.append(est.miselbo(full.log_p, full.log_q))
        pooled.append(est.pooled_mis_bound(full.log_p, full.log_q))
    matched, miselbo, pooled = torch.cat(matched), torch.cat(miselbo), torch.cat(pooled)  # [N, S], [N], [N]
    assert results["iwelbo_matched_per_member"] == pytest.approx(matched.mean(0).tolist(), rel=1e-6)
    best = int(matched.mean(0).argmax())
    assert results["best_member_matched"]["member"] == best + 1
    assert results["best_member_matched"]["stderr"] == pytest.approx(
        matched[:, best].std().item() / math.sqrt(NUM_EXAMPLES), rel=1e-5)
    for name, values in (("miselbo", miselbo), ("pooled", pooled)):
        entry = results["paired_differences"][f"{name}_minus_best_matched"]
        difference = values - matched[:, best]
        assert entry["mean"] == pytest.approx(difference.mean().item(), rel=1e-6, abs=1e-6)
        assert entry["stderr"] == pytest.approx(difference.std().item() / math.sqrt(NUM_EXAMPLES), rel=1e-5)
    for value in [*results["iwelbo_matched_per_member"], *results["iwelbo_matched_per_member_stderr"]]:
        assert math.isfinite(value)
    assert results["estimators"]["miselbo"]["mean"] == pytest.approx(miselbo.mean().item(), rel=1e-12)


def test_paired_summary_against_a_direct_computation():
    """summarise on made-up per-example values: best member by mean, paired mean and stderr."""
    plan = ValuePlan(("miselbo", "pooled"), 3, matched_baseline=True)
    columns = plan.columns()
    values = torch.randn(50, len(columns), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values[:, columns.index(("matched", 1))] += 0.5  # member 2 is best
    summary = summarise(plan, values, 784)
    best = values[:, columns.index(("matched", 1))]
    assert summary["best_member_matched"]["member"] == 2
    for name in ("miselbo", "pooled"):
        difference = (values[:, columns.index(("bound", name))] - best).numpy()
        entry = summary["paired_differences"][f"{name}_minus_best_matched"]
        assert entry["mean"] == pytest.approx(difference.mean(), rel=1e-12)
        assert entry["stderr"] == pytest.approx(difference.std(ddof=1) / math.sqrt(50), rel=1e-12)


def test_s2a_alone_samples_a_subset_and_records_it(ensemble_dir):
    results = evaluate(_settings(ensemble_dir, estimators=("s2a", "s2s"), subset_size=2))
    assert set(results["estimators"]) == {"s2a", "s2s"}
    for entry in results["estimators"].values():
        assert math.isfinite(entry["mean"]) and entry["stderr"] > 0
    assert results["subsets"]["scheme"] == "per_example" and results["subsets"]["num_active"] == 2
    assert results["subsets"]["sampled"] == "active members only"
    assert "iwelbo_per_member" not in results and "delta" not in results
    with pytest.raises(UserError, match="need every member sampled"):
        evaluate(_settings(ensemble_dir, estimators=("s2a",), matched_baseline=True))


def test_results_depend_on_the_seed_only(ensemble_dir):
    first = evaluate(_settings(ensemble_dir, num_examples=4, seed=3))
    again = evaluate(_settings(ensemble_dir, num_examples=4, seed=3))
    other = evaluate(_settings(ensemble_dir, num_examples=4, seed=4))
    assert first["estimators"] == again["estimators"]
    assert first["estimators"]["miselbo"]["mean"] != other["estimators"]["miselbo"]["mean"]


def test_binarisation_is_fixed_by_seed_and_index():
    dataset = load_dataset("mnist5k", ".", False, 6)
    examples = EvaluationExamples(dataset, "mnist5k", seed=5, num_x_bits=8)
    whole = examples.batch(0, 6)
    assert torch.equal(whole[2:5], examples.batch(2, 5))  # the same image whoever loads it
    assert set(whole.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(whole, EvaluationExamples(dataset, "mnist5k", seed=6, num_x_bits=8).batch(0, 6))


def test_shards_are_whole_batches_covering_every_example_once():
    for world_size in (1, 2, 3):
        shards = [shard_batches(10, 4, rank, world_size) for rank in range(world_size)]
        batches = sorted(batch for shard in shards for batch in shard)
        assert batches == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(ensemble_dir, tmp_path):
    single = evaluate(_settings(ensemble_dir, save=str(tmp_path / "one")))
    double = evaluate(_settings(ensemble_dir, world_size=2, save=str(tmp_path / "two")))
    assert double["world_size"] == 2 and single["world_size"] == 1
    assert double["num_examples"] == single["num_examples"] == NUM_EXAMPLES
    for name, entry in single["estimators"].items():
        assert math.isclose(double["estimators"][name]["mean"], entry["mean"], rel_tol=1e-6), name
        assert math.isclose(double["estimators"][name]["stderr"], entry["stderr"], rel_tol=1e-4), name
    assert double["iwelbo_per_member"] == pytest.approx(single["iwelbo_per_member"], rel=1e-6)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2


def test_an_evaluation_process_killed_by_a_signal_is_named_not_a_traceback(ensemble_dir, tmp_path, capsys,
                                                                           monkeypatch):
    def killed(worker, setups):  # what torch.multiprocessing.spawn raises when a child is SIGKILLed
        raise torch.multiprocessing.ProcessExitedException("process 1 terminated with signal SIGKILL",
                                                           error_index=1, error_pid=12345, exit_code=-9,
                                                           signal_name="SIGKILL")
    monkeypatch.setattr("miselbo.evaluation.evaluate.distributed.spawn_processes", killed)
    argv = ["--checkpoints", str(ensemble_dir), "--num_iw_samples", "4", "--save", str(tmp_path / "o"),
            "--world_size", "2", "--device", "cpu"]
    status, err = _cli(argv, capsys)[::2]
    assert status == 2 and "Traceback" not in err
    assert "evaluation process 1 of 2 (--world_size) was killed by SIGKILL" in err
    assert "ran out of memory" in err and "no results were written" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_flows_report_the_inversion_residual(tmp_path):
    args, models = make_members(2, seed=30, num_nf=1)
    images = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    paths = [str(path) for path in save_members(tmp_path, args, models)]
    results = evaluate(EvalSettings(checkpoints=paths, num_iw_samples=2, show_progress=False), images=images)
    assert results["num_examples"] == 3 and results["dataset"] == "mnist"
    assert 0 <= results["flow_inversion_max_residual"] < 1e-4


def test_a_flow_residual_above_the_limit_stops_with_exit_3_naming_member_and_group(tmp_path, capsys):
    args, models = make_members(2, seed=30, num_nf=1)
    paths = [str(path) for path in save_members(tmp_path / "ens", args, models)]
    images = (torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    accepted = evaluate(EvalSettings(checkpoints=paths, num_iw_samples=2, show_progress=False), images=images)
    residual = accepted["flow_inversion_max_residual"]
    assert 0 < residual < 1e-3  # the default limit accepts these flows
    with pytest.raises(FlowInversionError, match=r"member [12] \(.*\) at latent group \d") as caught:
        evaluate(EvalSettings(checkpoints=paths, num_iw_samples=2, show_progress=False,
                              max_flow_residual=residual / 10), images=images)
    assert caught.value.exit_code == 3
    status, _, err = _cli(["--checkpoints", *paths, "--dataset", "mnist5k", "--num_examples", "2",
                           "--num_iw_samples", "2", "--max_flow_residual", "0", "--save", str(tmp_path / "o")], capsys)
    assert status == 3 and "Traceback" not in err
    assert "above --max_flow_residual 0" in err and "at latent group" in err
    assert not (tmp_path / "o" / "results.json").exists()
    status, _, err = _cli(["--checkpoints", *paths, "--max_flow_residual", "-1", "--save", str(tmp_path / "o")], capsys)
    assert status == 2 and "--max_flow_residual must be a finite number >= 0" in err


# ----------------------------------------------------------------------------- flags and discovery

def test_public_flags_map_onto_settings(ensemble_dir):
    parse = build_parser().parse_args
    settings = settings_from_args(parse(["--q0", str(ensemble_dir / "p_and_q1"), "--q1", "None", "--q2",
                                         str(ensemble_dir / "q3"), "--checkpoints", str(ensemble_dir / "q2"),
                                         "--only_miselbo", "--ablation_file_name", "abl.xlsx", "--seed", "7"]))
    assert settings.checkpoints == [str(ensemble_dir / name) for name in ("p_and_q1", "q3", "q2")]
    assert settings.estimators == ("miselbo",) and settings.ablation_file_name == "abl" and settings.seed == 7
    assert settings_from_args(parse(["--checkpoints", str(ensemble_dir), "--only_iwelbo"])).estimators == \
        ("avg_iwelbo", "iwelbo")
    manifest_paths = settings_from_args(parse(["--checkpoints", str(ensemble_dir)])).checkpoints
    assert [p.split("/")[-2] for p in manifest_paths] == ["p_and_q1", "q2", "q3"]


def test_demo_ensemble_discovery(tmp_path, ensemble_dir):
    with pytest.raises(UserError, match="no ensemble in .* yet"):
        discover_demo_ensemble(tmp_path)
    demo = tmp_path / "mnist5k_demo"
    shutil.copytree(ensemble_dir, demo)
    assert [p.parent.name for p in discover_demo_ensemble(tmp_path)] == ["p_and_q1", "q2", "q3"]
    shutil.copytree(ensemble_dir, tmp_path / "other")
    assert discover_demo_ensemble(tmp_path)[0].parent.parent == demo  # the preferred one wins
    shutil.rmtree(demo)
    shutil.copytree(ensemble_dir, tmp_path / "third")
    with pytest.raises(UserError, match="several ensembles"):
        discover_demo_ensemble(tmp_path)


# ----------------------------------------------------------------------------- bad input

def _assert_user_error(status, err, *fragments):
    assert status == 2
    assert err.startswith("miselbo_eval.py: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_missing_unreadable_and_truncated_checkpoints(ensemble_dir, tmp_path, capsys):
    base = ["--num_iw_samples", "2", "--save", str(tmp_path / "o")]
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "nowhere.pt"), *base], capsys)[::2], "does not exist")
    (tmp_path / "empty_run").mkdir()
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "empty_run"), *base], capsys)[::2],
                       "holds no checkpoint.pt")
    data = (ensemble_dir / "q2" / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "truncated.pt"), *base], capsys)[::2],
                       "truncated or corrupted")
    shutil.copy(ensemble_dir / "q2" / "checkpoint.pt.sha256", tmp_path / "truncated.pt.sha256")
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "truncated.pt"), *base], capsys)[::2],
                       "SHA-256 mismatch")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "garbage.pt"), *base], capsys)[::2], "garbage.pt")


def test_empty_checkpoint_lists(tmp_path, capsys):
    _assert_user_error(*_cli(["--checkpoints", "--save", str(tmp_path / "o")], capsys)[::2], "list is empty")
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "manifest.json").write_text('{"checkpoints": []}')
    _assert_user_error(*_cli(["--checkpoints", str(tmp_path / "ens")], capsys)[::2], "lists no checkpoints")
    with pytest.raises(UserError, match="empty"):
        evaluate(EvalSettings(checkpoints=[]))


def test_other_architecture_is_refused_naming_the_flag(ensemble_dir, tmp_path, capsys):
    args, models = make_members(1, seed=40, num_latent_per_group=3)
    odd = save_members(tmp_path, args, models)[0]
    status, _, err = _cli(["--checkpoints", str(ensemble_dir / "p_and_q1"), str(odd), "--save", str(tmp_path / "o")],
                          capsys)
    _assert_user_error(status, err, "different architectures", "--num_latent_per_group: 2", "vs 3")


def test_mismatched_decoders_refused_unless_allowed(ensemble_dir, tmp_path, capsys):
    args, _ = make_members(1)
    stranger = build_model(args, seed=50).eval()  # its own decoder
    path = save_nvae_checkpoint(tmp_path, stranger, args,
                                miselbo={"decoder_fingerprint": stranger.decoder_fingerprint(), "role": "q"})
    argv = ["--checkpoints", str(ensemble_dir / "p_and_q1"), str(path), "--dataset", "mnist5k", "--num_examples",
            "2", "--num_iw_samples", "2", "--save", str(tmp_path / "o")]
    status, _, err = _cli(argv, capsys)
    _assert_user_error(status, err, "do not share one decoder", str(path), "--allow_decoder_mismatch")
    status, out, err = _cli(argv + ["--allow_decoder_mismatch"], capsys)
    assert status == 0 and "WARNING" in err and str(path) in err and "WARNING" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["decoder_problems"] and str(path) in results["decoder_problems"][0]


def test_a_fingerprint_the_weights_do_not_reproduce_is_refused(ensemble_dir, tmp_path, capsys):
    args, models = make_members(1, seed=20)
    path = save_nvae_checkpoint(tmp_path, models[0], args, miselbo={"decoder_fingerprint": "0" * 64})
    status, _, err = _cli(["--checkpoints", str(path), "--save", str(tmp_path / "o")], capsys)
    _assert_user_error(status, err, "records decoder fingerprint 0000", "hash to")


@pytest.mark.parametrize("flags, fragment", [
    (["--num_iw_samples", "0"], "--num_iw_samples must be a whole number >= 1"),
    (["--batch_size", "-1"], "--batch_size must be"),
    (["--S_list", "4"], "--S_list values must lie in 1..3"),
    (["--L_list", "0", "2"], "--L_list values must lie in 1..4"),
    (["--subset_size", "5", "--estimators", "s2a"], "--num_active 5 exceeds"),
    (["--dataset", "svhn"], "unknown data set"),
    (["--dataset", "celeba_64"], "does not support it"),
    (["--dataset", "cifar10"], "3-channel 32x32 images but the checkpoints' model (mnist) takes 1-channel"),
    (["--only_miselbo", "--only_iwelbo"], "exclude each other"),
    (["--world_size", "1000000000", "--device", "cpu"], "--world_size 1000000000 would start 1000000000 processes"),
])
def test_bad_flags(ensemble_dir, tmp_path, capsys, flags, fragment):
    argv = ["--checkpoints", str(ensemble_dir), "--num_iw_samples", "4", "--save", str(tmp_path / "o"), *flags]
    _assert_user_error(*_cli(argv, capsys)[::2], fragment)


def test_unwritable_save_folder(ensemble_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    status, _, err = _cli(["--checkpoints", str(ensemble_dir), "--save", str(tmp_path / "a_file" / "out")], capsys)
    _assert_user_error(status, err, "--save", "cannot create the output folder")


@pytest.mark.parametrize("images, fragment", [
    (torch.zeros(2, 3, 32, 32), "expected 1 channel(s)"),
    (torch.zeros(2, 1, 28, 28), "expected images of 32x32"),
    (torch.full((2, 1, 32, 32), 2.0), "values must lie in [0, 1]"),
    (torch.full((2, 1, 32, 32), 0.5), "binary pixels"),
    (torch.full((2, 1, 32, 32), float("nan")), "NaN or infinite"),
    (torch.full((2, 1, 32, 32), float("inf")), "NaN or infinite"),
])
def test_bad_images_are_refused(ensemble_dir, images, fragment):
    with pytest.raises(DataError) as caught:
        evaluate(_settings(ensemble_dir, dataset=None, num_examples=None), images=images)
    assert fragment in str(caught.value)


@pytest.mark.slow
def test_the_root_script_runs_and_reports_errors_without_traceback(tmp_path):
    script = REPO_ROOT / "miselbo_eval.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--num_iw_samples" in shown.stdout and "--q5" in shown.stdout
    failed = subprocess.run([sys.executable, str(script), "--checkpoints", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert failed.returncode == 2 and "does not exist" in failed.stderr and "Traceback" not in failed.stderr
