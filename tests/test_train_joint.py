"""Several new encoders in one run (train.py --num_new_encoders): the joint objective against a
brute-force computation with full forward passes, the checkpoint set, the acceptance run
(decoder bit-identical, encoders differ, miselbo_eval.py takes them with the parent), K = 1 equal
to the single-encoder run, resume after an interruption, and refused flag combinations."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch

from miselbo import training
from miselbo.storage.checkpoints import load_nvae_checkpoint
from miselbo.errors import UserError
from miselbo.ensemble.shared_decoder import share_decoder
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.distributions import reconstruction_loss
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha, kl_balancer
from miselbo.storage.safe_io import atomic_torch_save
from miselbo.training import joint as joint_module
from miselbo.training import joint_step as joint_step_module
from miselbo.training.joint_checkpoints import (PENDING_FOLDER, recover_pending,
                                                save_component_set)
from miselbo.training.joint_objective import JointSpec, draw_active, joint_loss
from miselbo.training.options import build_parser
from miselbo.training.prepare import resolve_run_args
from miselbo.training.stop import TrainingStopped
from test_train_common import REPO_ROOT, TINY_ARCH, is_decoder, load_raw, one_thread, quiet_env, run_args

pytestmark = pytest.mark.usefixtures("one_thread")
B = 3


# ----------------------------------------------------------------------------- the objective

def _tiny_models(count: int):
    """`count` tiny models (own seeds) sharing model 0's frozen decoder, in eval mode (no BN
    updates, so repeated passes see the same weights)."""
    args = build_parser().parse_args(TINY_ARCH)
    args.dataset = "mnist"
    x = (torch.rand(B, 1, 32, 32, generator=torch.Generator().manual_seed(7)) < 0.4).float()
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
        model.train()
        model(x)  # data-dependent initialisation
        models.append(model.eval())
    for model in models:
        model.freeze_decoder().eval()
    for model in models[1:]:
        share_decoder(models[0], model)
    return models, x


def _latents(models, count: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [[0.7 * torch.randn(B, *shape, generator=generator) for shape in models[0].latent_shapes]
            for _ in range(count)]


def _brute_force_loss(models, parent, x, active, latents, kl_weight, alpha, scorer_ids, scale):
    """Per component: full forward passes of every scorer at the component's latents."""
    total = 0.0
    scorers = [models[j] for j in scorer_ids] + ([parent] if parent is not None else [])
    for i, k in enumerate(active):
        own = models[k].forward_detailed(x, z=latents[i])
        rec = reconstruction_loss(models[k].decoder_output(own.logits), x, models[k].crop_output)
        balanced, _, _ = kl_balancer(own.kl_all, kl_weight, kl_balance=True, alpha=alpha)
        term = torch.zeros(B)
        if scorers:
            log_q = torch.stack([m.forward_detailed(x, z=latents[i]).log_q for m in scorers], dim=1)
            term = log_q[:, scorer_ids.index(k)] - (torch.logsumexp(log_q, dim=1) - math.log(len(scorers)))
        for b in range(B):  # a plain loop over the batch
            total += float(rec[b] + balanced[b] - kl_weight * term[b]) / B
    return total * scale


@pytest.mark.parametrize("objective, active, with_parent", [
    ("independent", [0, 1, 2], False), ("miselbo", [0, 1, 2], False), ("miselbo", [0, 1, 2], True),
    ("s2a", [0, 2], False), ("s2s", [1, 2], True)])
def test_joint_loss_equals_a_brute_force_computation(objective, active, with_parent):
    models, x = _tiny_models(4)
    parent = models[3] if with_parent else None
    models = models[:3]
    latents = _latents(models, len(active))
    alpha = kl_balance_alpha(models[0].groups_per_scale)
    spec = JointSpec(objective, len(active), with_parent)
    with torch.no_grad():
        for beta in (0.3, 1.0):  # with and without KL balancing
            terms = joint_loss(models, parent, x, spec, active, beta, alpha, 0.0, None, latents=latents)
            scorer_ids = {"independent": [], "miselbo": [0, 1, 2], "s2a": [0, 1, 2], "s2s": active}[objective]
            expected = _brute_force_loss(models, parent, x, active, latents, beta, alpha, scorer_ids,
                                         3 / len(active))
            assert float(terms.loss) == pytest.approx(expected, rel=2e-6)
            if objective != "independent":
                assert float(terms.mixture_term) != 0.0


def test_mixture_term_is_at_most_log_m_for_draws_from_the_components():
    models, x = _tiny_models(3)
    torch.manual_seed(0)
    with torch.no_grad():
        terms = joint_loss(models, None, x, JointSpec("miselbo", 3, False), [0, 1, 2], 1.0,
                           kl_balance_alpha(models[0].groups_per_scale), 0.0, None)
    # the generalised JSD of the draws; untrained encoders are far apart, so it is near log 3
    assert 0.0 < float(terms.mixture_term) <= math.log(3) + 1e-4  # (float32 round-off)


def test_only_the_mixture_objective_couples_the_encoders_gradients():
    models, x = _tiny_models(2)
    alpha = kl_balance_alpha(models[0].groups_per_scale)
    latents = _latents(models, 1)
    for spec, coupled in ((JointSpec("independent", 1, False), False), (JointSpec("miselbo", 2, False), True)):
        for model in models:
            model.zero_grad(set_to_none=True)
        joint_loss(models, None, x, spec, [0], 1.0, alpha, 0.0, None, latents=latents).loss.backward()
        other = [p.grad for p in models[1].encoder_parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in other) == coupled
        assert all(p.grad is None for p in models[0].decoder_parameters())


def test_s2a_active_sets_have_size_a_and_cover_every_component():
    spec = JointSpec("s2a", 2, False)
    seen = [0] * 4
    for step in range(400):
        active = draw_active(4, spec, torch.Generator().manual_seed(step))
        assert len(active) == 2 and len(set(active)) == 2 and active == sorted(active)
        for index in active:
            seen[index] += 1
    assert all(150 < count < 250 for count in seen), seen  # 200 expected each
    assert draw_active(3, JointSpec("miselbo", 3, False)) == [0, 1, 2]


# ----------------------------------------------------------------------------- the checkpoint set

def _writer(value):
    return lambda path: atomic_torch_save({"value": value}, path)


def test_a_committed_set_is_completed_and_an_incomplete_one_dropped(tmp_path):
    save_component_set(tmp_path, [_writer(1), _writer(2)])
    assert torch.load(tmp_path / "component-2" / "checkpoint.pt")["value"] == 2
    pending = tmp_path / PENDING_FOLDER
    pending.mkdir()  # a crash after writing one of two new files, before the marker
    atomic_torch_save({"value": 10}, pending / "component-1.pt")
    recover_pending(tmp_path)
    assert not pending.exists() and torch.load(tmp_path / "component-1" / "checkpoint.pt")["value"] == 1
    pending.mkdir()  # a crash after the marker, with one file already moved
    for index in (1, 2):
        atomic_torch_save({"value": 20 + index}, pending / f"component-{index}.pt")
    (pending / "complete").write_text("2\n")
    (pending / "component-1.pt").replace(tmp_path / "component-1" / "checkpoint.pt")
    recover_pending(tmp_path)
    values = [torch.load(tmp_path / f"component-{i}" / "checkpoint.pt")["value"] for i in (1, 2)]
    assert values == [21, 22] and not pending.exists()


# ----------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def parent(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("joint_runs")
    return root, training.train(run_args(root, "p_and_q1"))


def _joint_argv(root, parent_result, save, *extra):
    return ["--root", str(root), "--save", save, "--train_new_q", "--p_and_q1_path",
            str(parent_result.save_dir), "--seed", "5", *extra]


@pytest.mark.slow
def test_acceptance_three_miselbo_encoders_share_the_parent_decoder(parent):
    root, parent_result = parent
    result = training.train(_joint_argv(root, parent_result, "joint", "--num_new_encoders", "3",
                                        "--mixture_objective", "miselbo"))
    folder = root / "eval-joint"
    parent_state = load_raw(parent_result.checkpoint_path)["state_dict"]
    encoders = []
    for index in (1, 2, 3):
        raw = load_raw(folder / f"component-{index}" / "checkpoint.pt")
        state = raw["state_dict"]
        for key in (k for k in parent_state if is_decoder(k)):
            assert torch.equal(state[key], parent_state[key]), key
        entry = raw["miselbo"]
        assert (entry["role"], entry["seed"], entry["component"], entry["num_components"],
                entry["objective"]) == ("q", 4 + index, index, 3, "miselbo")
        assert entry["decoder_fingerprint"] == entry["parent_fingerprint"]
        assert raw["global_step"] == 8 and raw["args"].seed == 4 + index
        load_nvae_checkpoint(folder / f"component-{index}" / "checkpoint.pt")  # strict, safe
        encoders.append({k: v for k, v in state.items() if not is_decoder(k) and v.is_floating_point()})
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(encoders[a][k], encoders[b][k]) for k in encoders[a])
    summary = json.loads((folder / "joint_result.json").read_text())
    assert [c["seed"] for c in summary["components"]] == [5, 6, 7]
    assert result.checkpoint_path == folder / "component-1" / "checkpoint.pt"
    checkpoints = [str(parent_result.save_dir)] + [str(folder / f"component-{i}") for i in (1, 2, 3)]
    evaluation = subprocess.run(
        [sys.executable, str(REPO_ROOT / "miselbo_eval.py"), "--checkpoints", *checkpoints,
         "--num_iw_samples", "2", "--num_examples", "4", "--batch_size", "4", "--save", str(root / "ev")],
        cwd=REPO_ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr
    values = json.loads((root / "ev" / "results.json").read_text())
    assert values["S"] == 4 and math.isfinite(values["estimators"]["miselbo"]["mean"])


@pytest.mark.slow
def test_one_new_encoder_is_the_single_encoder_run(parent, tmp_path):
    _root, parent_result = parent
    single = training.train(_joint_argv(tmp_path, parent_result, "single"))
    flagged = training.train(_joint_argv(tmp_path, parent_result, "k1", "--num_new_encoders", "1",
                                         "--mixture_objective", "miselbo"))
    assert flagged.checkpoint_path == tmp_path / "eval-k1" / "checkpoint.pt"
    assert flagged.parameter_sha256 == single.parameter_sha256
    assert flagged.test_nelbo == single.test_nelbo


@pytest.mark.slow
def test_interrupted_joint_run_resumes_to_the_full_number_of_steps(parent, tmp_path, monkeypatch):
    _root, parent_result = parent
    argv = _joint_argv(tmp_path, parent_result, "s2a", "--num_new_encoders", "3",
                       "--mixture_objective", "s2a", "--num_active", "1", "--include_parent_encoder")
    original_step = joint_module.JointSession.step

    def step_then_sigterm(self, x, global_step):
        terms = original_step(self, x, global_step)
        if global_step == 5:  # the second step of epoch 2
            self.guard.stop_signal = signal.SIGTERM
        return terms

    monkeypatch.setattr(joint_module.JointSession, "step", step_then_sigterm)
    with pytest.raises(TrainingStopped) as stopped:
        training.train(argv)
    assert stopped.value.exit_code == 128 + signal.SIGTERM and "--cont_training" in stopped.value.message
    folder = tmp_path / "eval-s2a"
    saved = [load_raw(folder / f"component-{i}" / "checkpoint.pt") for i in (1, 2, 3)]
    assert [(s["global_step"], s["miselbo"]["resume"]["step_in_epoch"]) for s in saved] == [(6, 2)] * 3
    monkeypatch.setattr(joint_module.JointSession, "step", original_step)
    with pytest.raises(UserError):
        training.train(argv)  # without --cont_training the folder's checkpoints are not replaced
    result = training.train(argv + ["--cont_training"])
    assert result.global_step == 8
    assert "resuming at epoch 2, global step 6" in (folder / "log.txt").read_text()
    for index in (1, 2, 3):
        raw = load_raw(folder / f"component-{index}" / "checkpoint.pt")
        assert raw["global_step"] == 8
        # s2a scores under all three, so every encoder was updated at each of the 8 steps
        assert all(float(state["step"]) == 8 for state in raw["optimizer"]["state"].values())


@pytest.mark.parametrize("extra, words", [
    (["--num_new_encoders", "0"], "--num_new_encoders must be a whole number >= 1"),
    (["--mixture_objective", "s2a", "--num_new_encoders", "3"], "needs --num_active"),
    (["--mixture_objective", "s2s", "--num_new_encoders", "2", "--num_active", "3"], "needs --num_active"),
    (["--num_active", "1", "--num_new_encoders", "2"], "only used with --mixture_objective s2a"),
    (["--include_parent_encoder", "--num_new_encoders", "2"], "needs --mixture_objective"),
])
def test_meaningless_joint_flags_are_refused(parent, tmp_path, extra, words):
    _root, parent_result = parent
    with pytest.raises(UserError, match=words):
        resolve_run_args(_joint_argv(tmp_path, parent_result, "bad", *extra))


def test_joint_flags_need_train_new_q(tmp_path):
    with pytest.raises(UserError, match="need --train_new_q"):
        resolve_run_args(run_args(tmp_path, "x", "--num_new_encoders", "2"))


@pytest.mark.slow
def test_two_processes_train_a_joint_run_and_keep_identical_parameters(parent, tmp_path):
    _root, parent_result = parent
    result = training.train(_joint_argv(tmp_path, parent_result, "ddp", "--num_new_encoders", "2",
                                        "--mixture_objective", "s2s", "--num_active", "1",
                                        "--include_parent_encoder", "--num_process_per_node", "2"))
    assert len(result.rank_parameter_sha256) == 2  # each over both components
    assert result.rank_parameter_sha256[0] == result.rank_parameter_sha256[1]
    for index in (1, 2):  # 64 images, 2 processes x 16 per step: 2 steps per epoch
        assert load_raw(tmp_path / "eval-ddp" / f"component-{index}" / "checkpoint.pt")["global_step"] == 4


@pytest.mark.slow
def test_a_non_finite_joint_loss_stops_before_updating_and_keeps_the_last_set(parent, tmp_path, monkeypatch):
    _root, parent_result = parent
    original = joint_step_module.joint_loss
    calls = []

    def nan_at_the_sixth_step(*args, **kwargs):
        terms = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(joint_step_module, "joint_loss", nan_at_the_sixth_step)
    with pytest.raises(TrainingStopped) as stopped:
        training.train(_joint_argv(tmp_path, parent_result, "nan", "--num_new_encoders", "2",
                                   "--mixture_objective", "miselbo"))
    assert stopped.value.exit_code == 3 and "global step 4" in stopped.value.message
    for index in (1, 2):  # the set written after epoch 1 is kept
        assert load_raw(tmp_path / "eval-nan" / f"component-{index}" / "checkpoint.pt")["global_step"] == 4


def test_pipeline_joint_trains_q2_to_qs_in_one_run_and_evaluates_its_components(tmp_path):
    from miselbo.pipeline import run as pipeline
    settings = pipeline.parse_settings(["--preset", "tiny", "--joint", "s2a", "--joint_num_active", "1",
                                        "--num_encoders", "4", "--out", str(tmp_path), "--dry_run"])
    assert settings.stage_names() == ["p_and_q1", "joint"]
    argv = pipeline.training_argv(settings, "joint", settings.seeds[1])
    assert argv[argv.index("--num_new_encoders") + 1] == "3" and argv[argv.index("--num_active") + 1] == "1"
    assert argv[argv.index("--seed") + 1] == "2" and "--train_new_q" in argv
    evaluated = pipeline.evaluation_argv(settings)
    members = evaluated[1:evaluated.index("--num_iw_samples")]
    assert members == [str(tmp_path / "eval-p_and_q1" / "checkpoint.pt")] + [
        str(tmp_path / "eval-joint" / f"component-{k}" / "checkpoint.pt") for k in (1, 2, 3)]
    with pytest.raises(UserError, match="consecutive"):
        pipeline.parse_settings(["--joint", "miselbo", "--seeds", "1", "2", "5"])
