"""miselbo_eval.py under user mistakes and odd inputs: one member with the compute-matched baseline,
seeds out of range, sizes that cannot fit into memory, members given twice, more examples than the
split holds, and broken manifest values. Each mistake ends with exit status 2 and one line
`miselbo_eval.py: error: ...`, writes nothing and keeps earlier results."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from ensemble_helpers import binary_batch, make_members, one_torch_thread, save_members  # noqa: F401
from miselbo.errors import UserError
from miselbo.evaluation import memory
from miselbo.evaluation import settings as eval_settings
from miselbo.evaluation.evaluate import EvalSettings, build_parser, evaluate, main, settings_from_args
from miselbo.evaluation.report import ValuePlan
from miselbo.ensemble.log_weights import ReducedLogWeights
from miselbo.runtime import flags
from miselbo.runtime.cli import run_cli

GIB = 1 << 30
DEMO = REPO_ROOT / "models" / "mnist5k_demo"


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Run in a fresh folder, so that the default --save (results/miselbo) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def members_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("members")
    args, models = make_members(3, seed=40)
    save_members(folder, args, models, seed=40)
    return folder


def _cli(argv, capsys):
    status = run_cli(main, argv, prog="miselbo_eval.py")
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _refused(status, err, *fragments):
    assert status == 2, err
    assert err.startswith("miselbo_eval.py: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _base(members_dir, *names, save=None):
    return ["--checkpoints", *[str(members_dir / name) for name in names or ("p_and_q1", "q2", "q3")],
            "--dataset", "mnist5k", "--num_examples", "4", "--num_iw_samples", "2", "--batch_size", "4",
            *(["--save", str(save)] if save else [])]


def _previous_results(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text('{"previous": true}\n')
    return folder


def _kept(folder):
    assert json.loads((folder / "results.json").read_text()) == {"previous": True}
    assert sorted(path.name for path in folder.iterdir()) == ["results.json"]


# ----------------------------------------------------------------------------- 1. S = 1, matched baseline

def test_one_member_matched_baseline_is_its_iwelbo(members_dir, tmp_path):
    """S = 1: S x L = L own samples, so the matched baseline is the member's IWELBO, the best member
    is q1 and both paired differences are 0 (MISELBO and the pooled bound are that IWELBO too)."""
    settings = EvalSettings(checkpoints=[str(members_dir / "p_and_q1")], num_iw_samples=3, dataset="mnist5k",
                            num_examples=5, batch_size=2, ablation=True, show_progress=False)
    results = evaluate(settings)
    assert results["S"] == 1
    assert results["iwelbo_matched_per_member"] == pytest.approx(results["iwelbo_per_member"], rel=1e-12)
    assert results["best_member_matched"]["member"] == 1
    for entry in results["paired_differences"].values():
        assert entry["mean"] == pytest.approx(0.0, abs=1e-9)
    iwelbo = results["iwelbo_per_member"][0]
    assert results["estimators"]["miselbo"]["mean"] == pytest.approx(iwelbo, rel=1e-12)
    rows = {(row["S"], row["L"], row["estimator"]): row["mean"] for row in results["ablation"]}
    for samples in (1, 2, 3):  # the default --L_list up to L = 3
        assert rows[(1, samples, "best_member_matched")] == pytest.approx(rows[(1, samples, "avg_iwelbo")],
                                                                          rel=1e-12)


def test_per_example_values_without_extra_draws():
    """ValuePlan.per_example with the matched baseline and S = 1 (no extra draws: None)."""
    log_p = torch.randn(2, 1, 4, dtype=torch.float64)
    log_q = torch.randn(2, 1, 4, dtype=torch.float64)
    weights = ReducedLogWeights(log_p, log_q, log_q.clone(), log_q_mix_prefix={1: log_q.clone()})
    plan = ValuePlan(("miselbo", "iwelbo"), 1, None, (1,), (2, 4), True)
    values = plan.per_example(weights)
    columns = plan.columns()
    iwelbo = torch.logsumexp(log_p - log_q, dim=-1)[:, 0] - math.log(4)
    assert torch.allclose(values[:, columns.index(("matched", 0))], iwelbo)
    assert torch.allclose(values[:, columns.index(("member", 0))], iwelbo)
    half = torch.logsumexp((log_p - log_q)[:, 0, :2], dim=-1) - math.log(2)
    assert torch.allclose(values[:, columns.index(("ablation_matched", 1, 2, 0))], half)


@pytest.mark.parametrize("flag", ["--ablation", "--matched_baseline"])
def test_one_member_cli_with_the_matched_baseline(members_dir, tmp_path, capsys, flag):
    status, out, err = _cli(_base(members_dir, "p_and_q1", save=tmp_path / "o") + [flag], capsys)
    assert status == 0, err
    assert "iwelbo q1@SL" in out and "best member at S*L = 2 samples: q1" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["iwelbo_matched_per_member"] == pytest.approx(results["iwelbo_per_member"], rel=1e-12)


# ----------------------------------------------------------------------------- 2. seeds and counts

@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "4294967296"])
def test_seeds_out_of_range_are_refused_like_train_py(members_dir, tmp_path, capsys, seed):
    save = _previous_results(tmp_path / "o")
    status, _, err = _cli(_base(members_dir, save=save) + ["--seed", seed], capsys)
    _refused(status, err, f"--seed must lie in 0 .. {flags.MAX_SEED}, got {seed}.")
    _kept(save)


def test_the_largest_seed_is_taken(members_dir):
    args = build_parser().parse_args(_base(members_dir) + ["--seed", str(flags.MAX_SEED)])
    assert eval_settings.validated_settings(settings_from_args(args)).seed == flags.MAX_SEED


def test_shared_flag_checks_say_the_same_everywhere():
    for value in (0, -3, 2.7, True, None, "abc"):
        with pytest.raises(UserError) as caught:
            flags.count("--num_iw_samples", value)
        assert str(caught.value).startswith("--num_iw_samples must be a whole number >= 1, got ")
    assert flags.count("--num_iw_samples", 1) == 1 and flags.optional_count("--batch_size", None) is None
    assert flags.seed("--seed", 0) == 0 and flags.seed("--seed", flags.MAX_SEED) == flags.MAX_SEED
    with pytest.raises(UserError, match=r"^--seed must be a whole number in 0 \.\. 4294967295, got true\.$"):
        flags.seed("--seed", True, as_json=True)


# ----------------------------------------------------------------------------- 3. memory

def _available(monkeypatch, amount):
    monkeypatch.setattr(memory, "available_bytes", lambda device: amount)


def test_absurd_sample_counts_are_refused_naming_the_largest_that_fits(members_dir, tmp_path, capsys,
                                                                       monkeypatch):
    _available(monkeypatch, 2 * GIB)
    save = _previous_results(tmp_path / "o")
    status, _, err = _cli(_base(members_dir, save=save)[:-4] + ["--save", str(save), "--num_iw_samples",
                                                                 "100000000000"], capsys)
    _refused(status, err, "--num_iw_samples 100000000000: one evaluation batch would need about",
             "70% of the 2.1 GB available on cpu", "The largest --num_iw_samples that fits is ")
    _kept(save)
    largest = int(err.split("The largest --num_iw_samples that fits is ")[1].split()[0])
    assert largest > 1000
    settings = eval_settings.validated_settings(EvalSettings(checkpoints=["a", "b", "c"], num_iw_samples=largest,
                                                             num_examples=4, batch_size=4))
    typed = memory.FlagValues(largest, 4, False, None)
    config = make_members(1)[1][0].config
    memory.require_evaluation_fits(config, settings, 4, typed, torch.device("cpu"), available=2 * GIB)
    with pytest.raises(UserError, match="--num_iw_samples"):
        memory.require_evaluation_fits(config, EvalSettings(**{**vars(settings), "num_iw_samples": largest + 1}),
                                       4, typed, torch.device("cpu"), available=2 * GIB)


def test_a_chunk_that_does_not_fit_is_refused_not_shrunk(members_dir, tmp_path, capsys, monkeypatch):
    """The chunk size changes the draws (each decoder pass draws one tensor per group), so it is
    never lowered silently: the refusal names --chunk_size and the largest one that fits."""
    _available(monkeypatch, GIB // 4)
    status, _, err = _cli(_base(members_dir)[:-2] + ["--num_iw_samples", "4000", "--chunk_size", "4000"],
                          capsys)
    _refused(status, err, "--chunk_size 4000: one evaluation batch", "The largest --chunk_size that fits is ")
    largest = int(err.split("The largest --chunk_size that fits is ")[1].split()[0])
    assert 1 <= largest < 4000


def test_a_batch_size_that_does_not_fit_is_refused(members_dir, tmp_path, capsys, monkeypatch):
    _available(monkeypatch, GIB // 8)
    argv = _base(members_dir)[:-6] + ["--num_examples", "64", "--num_iw_samples", "20000", "--batch_size", "64",
                                      "--chunk_size", "1"]
    status, _, err = _cli(argv, capsys)
    _refused(status, err, "--batch_size 64: one evaluation batch", "The largest --batch_size that fits is ")


def test_the_demo_evaluation_fits_and_the_estimate_grows_with_the_sizes():
    config = make_members(1)[1][0].config
    small = memory.PassPlan(batch=4, num_samples=20, chunk=8, num_members=3)
    assert memory.peak_bytes(config, small) < memory.peak_bytes(config, memory.PassPlan(8, 20, 8, 3))
    assert memory.peak_bytes(config, small) < memory.peak_bytes(config, memory.PassPlan(4, 40, 8, 3))
    assert memory.peak_bytes(config, small) < memory.peak_bytes(config, memory.PassPlan(4, 20, 16, 3))
    assert memory.peak_bytes(config, small) < memory.peak_bytes(config, memory.PassPlan(4, 20, 8, 3, (1, 2, 3), True))
    available = memory.available_bytes(torch.device("cpu"))
    assert available is None or available > 0


_MEASURE = r"""
import json, os, resource, sys
import torch
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
torch.set_num_threads(1)
from ensemble_helpers import binary_batch, make_members
from miselbo.ensemble.log_weights import Ensemble
from miselbo.evaluation import memory
from miselbo.evaluation.members import load_members
from miselbo.evaluation.report import ValuePlan
from miselbo.runtime.cpu_layout import use_fast_cpu_layout
which, batch, samples = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if which == "demo":
    models = load_members([os.path.join(sys.argv[1], "models", "mnist5k_demo", name, "checkpoint.pt")
                           for name in ("p_and_q1", "q2", "q3")]).models
else:
    models = make_members(3)[1]
use_fast_cpu_layout(models)
ensemble = Ensemble(models, check_decoders=False)
plan = ValuePlan(("miselbo", "pooled", "avg_iwelbo", "iwelbo", "avg_elbo", "jsd"), 3)
x = binary_batch(models[0], batch)
plan.per_example(ensemble.reduced_weights(x[:1], 1, torch.Generator().manual_seed(0), 1))
page = os.sysconf("SC_PAGE_SIZE")
before = int(open("/proc/self/statm").read().split()[1]) * page
plan.per_example(ensemble.reduced_weights(x, samples, torch.Generator().manual_seed(0), samples))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
estimate = memory.process_bytes(models[0].config, memory.PassPlan(batch, samples, samples, 3), "cpu")
print(json.dumps({"growth": peak - before, "estimate": estimate}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
@pytest.mark.parametrize("model, samples", [("tiny", 48), ("demo", 96)])
def test_the_estimate_is_within_the_stated_factor_of_the_measured_peak(model, samples):
    """One decoder pass per member of 16 examples x L samples (about 0.5 GB each), in a fresh
    process: the estimate (with the CPU allocator's overhead) lies within 0.5x .. 2.5x of how much
    the process's peak resident memory grew (0.9x .. 1.7x measured, also with other processes
    running). Smaller passes are not used: a first pass's one-off growth (oneDNN's kernels, malloc
    arenas) varied by up to 0.3 GB between runs."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(REPO_ROOT), model, "16", str(samples)],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = measured["estimate"] / measured["growth"]
    assert 0.5 <= ratio <= 2.5, measured


# ----------------------------------------------------------------------------- 4. duplicate members

def test_one_checkpoint_file_given_twice_is_refused_naming_both_positions(members_dir, tmp_path, capsys):
    save = _previous_results(tmp_path / "o")
    argv = _base(members_dir, "p_and_q1", "q2", "p_and_q1/checkpoint.pt", save=save)
    status, _, err = _cli(argv, capsys)
    _refused(status, err, "members 1 and 3 are the same checkpoint file", "--allow_duplicate_members")
    _kept(save)
    (tmp_path / "link").symlink_to(members_dir / "q2")
    status, _, err = _cli(["--checkpoints", str(members_dir / "q2"), str(tmp_path / "link"), *argv[4:]], capsys)
    _refused(status, err, "members 1 and 2 are the same checkpoint file")


def test_members_with_equal_encoders_are_refused_unless_allowed(members_dir, tmp_path, capsys):
    shutil.copytree(members_dir / "q2", tmp_path / "copy_of_q2")
    argv = ["--checkpoints", str(members_dir / "p_and_q1"), str(members_dir / "q2"), str(tmp_path / "copy_of_q2"),
            *_base(members_dir)[4:]]
    status, _, err = _cli(argv + ["--save", str(tmp_path / "o")], capsys)
    _refused(status, err, "members 2 and 3 have identical encoder weights")
    assert not (tmp_path / "o").exists()
    status, out, err = _cli(argv + ["--allow_duplicate_members", "--save", str(tmp_path / "o")], capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["S"] == 3 and results["duplicate_members"] == [[2, 3]]
    status, out, err = _cli(_base(members_dir, "q2", "q2") + ["--allow_duplicate_members"], capsys)
    assert status == 0 and "jsd                   0.0000" in out


# ----------------------------------------------------------------------------- 5. more examples than the split

def test_more_examples_than_there_are_prints_a_notice(members_dir, capsys):
    settings = EvalSettings(checkpoints=[str(members_dir / "p_and_q1")], num_iw_samples=1, num_examples=50,
                            batch_size=8, show_progress=False)
    images = binary_batch(make_members(1)[1][0], 6)
    results = evaluate(settings, images=images)
    assert results["num_examples"] == 6
    err = capsys.readouterr().err
    assert "miselbo_eval.py: note: --num_examples 50 is more than the 6 examples given; evaluating all 6." in err
    evaluate(EvalSettings(**{**vars(settings), "num_examples": 6}), images=images)
    assert "note" not in capsys.readouterr().err


def test_more_examples_than_the_split_names_both_numbers(members_dir, capsys):
    status, _, err = _cli(_base(members_dir, "p_and_q1")[:-6] + ["--num_examples", "5000", "--num_iw_samples", "1",
                                                                 "--batch_size", "250"], capsys)
    assert status == 0
    assert ("note: --num_examples 5000 is more than the 1000 examples in the test split of mnist5k; evaluating "
            "all 1000.") in err


# ----------------------------------------------------------------------------- 6. manifest values

@pytest.fixture
def manifest_folder(tmp_path, monkeypatch, members_dir):
    folder = tmp_path / "models" / "ens"
    folder.mkdir(parents=True)
    monkeypatch.setattr(eval_settings, "discover_demo_folder", lambda: folder)

    def write(defaults):
        content = {"checkpoints": [str(members_dir / "p_and_q1" / "checkpoint.pt")], "eval_defaults": defaults}
        (folder / "manifest.json").write_text(json.dumps(content))
        return folder / "manifest.json"
    return write


@pytest.mark.parametrize("value, shown", [(2.7, "2.7"), (True, "true"), ("abc", '"abc"'), (None, "null"),
                                          ([20], "[20]"), (-5, "-5"), (0, "0")])
def test_manifest_values_are_checked_like_flags_naming_file_and_field(manifest_folder, capsys, value, shown):
    manifest = manifest_folder({"num_iw_samples": value})
    status, _, err = _cli(["--num_examples", "2"], capsys)
    _refused(status, err, f"{manifest}: eval_defaults.num_iw_samples must be a whole number >= 1, got {shown}.")
    assert "--num_iw_samples must" not in err


def test_a_good_manifest_value_is_used_and_a_typed_flag_wins(manifest_folder):
    manifest_folder({"num_iw_samples": 3, "batch_size": 7, "chunk_size": 2})
    plain = settings_from_args(build_parser().parse_args([]))
    assert (plain.num_iw_samples, plain.batch_size, plain.chunk_size) == (3, 7, 2)
    typed = settings_from_args(build_parser().parse_args(["--num_iw_samples", "5", "--batch_size", "4",
                                                          "--chunk_size", "1"]))
    assert (typed.num_iw_samples, typed.batch_size, typed.chunk_size) == (5, 4, 1)


def test_one_ensemble_folder_given_alone_takes_its_manifest_values(manifest_folder, members_dir):
    manifest = manifest_folder({"num_iw_samples": 3, "batch_size": 7})
    alone = settings_from_args(build_parser().parse_args(["--checkpoints", str(manifest.parent)]))
    assert (alone.num_iw_samples, alone.batch_size) == (3, 7)
    # with another member beside it, the folder's values no longer describe the ensemble
    mixed = settings_from_args(build_parser().parse_args(
        ["--checkpoints", str(manifest.parent), str(members_dir / "q2"), "--allow_duplicate_members"]))
    assert (mixed.num_iw_samples, mixed.batch_size) == (eval_settings.DEFAULT_NUM_IW_SAMPLES, None)


@pytest.mark.parametrize("field", ["batch_size", "chunk_size"])
def test_manifest_batch_and_chunk_sizes_are_checked_like_flags(manifest_folder, capsys, field):
    manifest = manifest_folder({field: 0})
    status, _, err = _cli(["--num_examples", "2"], capsys)
    _refused(status, err, f"{manifest}: eval_defaults.{field} must be a whole number >= 1, got 0.")


def test_unknown_manifest_defaults_are_refused(manifest_folder, capsys):
    manifest = manifest_folder({"num_iw_sample": 3})
    status, _, err = _cli([], capsys)
    _refused(status, err, f"{manifest}: eval_defaults holds 'num_iw_sample'", "known: num_iw_samples")


def test_the_shipped_manifest_passes():
    assert eval_settings.read_eval_defaults(DEMO) == {"num_iw_samples": 20, "batch_size": 50, "chunk_size": 20}
