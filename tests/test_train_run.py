"""Training in-process on a tiny model: the loss falls, checkpoints load strictly and resume, a new
encoder leaves the parent's decoder bit-identical, a NaN loss stops cleanly, and mistakes are
refused with exit status 2. Also the functions NVAE's evaluate.py imports from train.py."""
import argparse
import dataclasses
import importlib
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import golden_case_dir
from miselbo import training
from miselbo.storage.checkpoints import NVAE_CHECKPOINT_KEYS, load_nvae_checkpoint, read_checkpoint
from miselbo.runtime.distributed import DistributedSetup
from miselbo.nvae.config import get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.nvae.objectives import kl_balance_alpha
from miselbo.nvae.optim import build_optimizer
from miselbo.training import loop
from miselbo.training.objective import RegularisedLayers
from miselbo.training.settings import TrainSettings
from miselbo.training.options import build_parser
from miselbo.training.session import build_run_loaders
from miselbo.training.stop import StepGuard, StopRequests, TrainingStopped
from test_train_common import (REPO_ROOT, STEPS_PER_EPOCH, TINY_ARCH, is_decoder, load_raw,
                               one_thread, run_args)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parent(tmp_path_factory, one_thread):
    """A finished 2-epoch p_and_q run (the parent of the new encoders below)."""
    root = tmp_path_factory.mktemp("runs")
    result = training.train(run_args(root, "p_and_q1"))
    return root, result


def _tiny_args(**overrides):
    argv = TINY_ARCH + ["--warmup_epochs", "0", "--kl_anneal_portion", "0", "--kl_const_portion", "0",
                        "--weight_decay_norm", "1e-2"]
    args = build_parser().parse_args(argv)
    args.dataset = "mnist"
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_a_few_training_steps_lower_the_loss():
    args = _tiny_args()
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    settings = TrainSettings.from_args(args)
    parts = loop.StepParts(model=model, optimizer=build_optimizer(model.parameters(), 1e-2, 3e-4, False),
                           grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
                           trainable=list(model.parameters()),
                           alpha=kl_balance_alpha(model.groups_per_scale), layers=RegularisedLayers(),
                           settings=settings, iterations_per_epoch=100, device=torch.device("cpu"))
    x = (torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    guard = StepGuard(StopRequests(announce=False), torch.device("cpu"))
    model.train()
    losses = [float(loop.train_step(parts, x, step, guard).loss.detach()) for step in range(25)]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


def test_cpu_training_runs_channels_last_and_differs_from_the_default_layout_only_by_rounding(
        parent, tmp_path, monkeypatch):
    root, result = parent  # trained channels-last, as every CPU run
    layouts = []
    monkeypatch.setattr("miselbo.training.run.use_fast_cpu_layout",
                        lambda models: layouts.append([m.stem.weight.is_contiguous() for m in models]))
    default = training.train(run_args(tmp_path, "p_and_q1"))  # the same run, default layout
    assert layouts == [[True]]  # the hook was reached, and it left the weights as they were
    ours = load_raw(result.save_dir / "checkpoint.pt")["state_dict"]
    plain = load_raw(default.save_dir / "checkpoint.pt")["state_dict"]
    four_d = [key for key, value in ours.items() if value.dim() == 4]
    assert four_d and all(ours[key].is_contiguous(memory_format=torch.channels_last) for key in four_d)
    assert not all(torch.equal(ours[key], plain[key]) for key in ours)  # another rounding...
    for key in ours:  # ... and nothing more, after 8 updates
        assert torch.allclose(ours[key].float(), plain[key].float(), rtol=1e-3, atol=1e-4), key


def test_checkpoint_has_nvae_keys_loads_strictly_and_records_the_run(parent):
    root, result = parent
    assert result.global_step == 2 * STEPS_PER_EPOCH and result.epochs == 2
    assert result.checkpoint_path == root / "eval-p_and_q1" / "checkpoint.pt"
    raw = load_raw(result.checkpoint_path)
    assert set(raw) == set(NVAE_CHECKPOINT_KEYS) | {"miselbo"}
    assert (raw["epoch"], raw["global_step"]) == (2, 8)
    model, args, checkpoint = load_nvae_checkpoint(result.checkpoint_path)  # strict, safe
    assert (args.dataset, args.miselbo_dataset, args.num_total_iter) == ("mnist", "mnist5k", 8)
    entry = checkpoint["miselbo"]
    assert entry["role"] == "p_and_q" and entry["seed"] == 1 and entry["parent_path"] is None
    assert entry["decoder_fingerprint"] == model.decoder_fingerprint() == result.decoder_fingerprint
    assert all(float(state["step"]) == 8 for state in raw["optimizer"]["state"].values())
    assert result.test_nelbo > result.test_neg_log_p > 0 and result.final_iw_samples == 4
    assert (root / "eval-p_and_q1" / "log.txt").read_text().count("checkpoint written") == 2
    assert list((root / "eval-p_and_q1").glob("events.out.tfevents.*"))


def test_cont_training_resumes_at_the_saved_step_with_the_optimizer_state(parent, tmp_path):
    root, _ = parent
    shutil.copytree(root / "eval-p_and_q1", tmp_path / "eval-resumed")
    result = training.train(run_args(tmp_path, "resumed", "--epochs", "3", "--cont_training"))
    assert (result.epochs, result.global_step) == (3, 3 * STEPS_PER_EPOCH)
    raw = load_raw(result.checkpoint_path)
    assert (raw["epoch"], raw["global_step"]) == (3, 12)
    # Adamax's step counts continued from 8: the optimizer state was restored, not rebuilt.
    assert all(float(state["step"]) == 12 for state in raw["optimizer"]["state"].values())
    assert raw["scheduler"]["last_epoch"] == 1  # stepped once, at epoch 3 (> warmup_epochs = 1)
    assert "resuming at epoch 3, global step 8" in (tmp_path / "eval-resumed" / "log.txt").read_text()


def _new_encoder(root, parent_dir, save, seed, *extra):
    argv = ["--root", str(root), "--save", save, "--train_new_q", "--p_and_q1_path", str(parent_dir),
            "--seed", str(seed), *extra]
    return training.train(argv)


@pytest.fixture(scope="module")
def new_encoders(parent, tmp_path_factory, one_thread):
    root, parent_result = parent
    runs = tmp_path_factory.mktemp("q_runs")
    fast = _new_encoder(runs, parent_result.save_dir, "q2", 2, "--fast_adamax", "--param_check")
    plain = _new_encoder(runs, parent_result.save_dir, "q3", 3)
    return parent_result, fast, plain


def test_new_encoder_leaves_every_decoder_tensor_bit_identical(new_encoders):
    parent_result, fast, plain = new_encoders
    parent_state = load_raw(parent_result.checkpoint_path)["state_dict"]
    decoder_keys = [key for key in parent_state if is_decoder(key)]
    assert any(key.endswith("running_mean") for key in decoder_keys)
    assert any(key.endswith("num_batches_tracked") for key in decoder_keys)
    assert "prior_ftr0" in decoder_keys and any(k.startswith("post_process.") for k in decoder_keys)
    for child in (fast, plain):
        child_state = load_raw(child.checkpoint_path)["state_dict"]
        assert set(child_state) == set(parent_state)
        for key in decoder_keys:
            assert torch.equal(child_state[key], parent_state[key]), key


def test_new_encoder_records_the_parent_fingerprint_and_trains_its_encoder(new_encoders):
    parent_result, fast, plain = new_encoders
    for child, seed in ((fast, 2), (plain, 3)):
        model, args, checkpoint = load_nvae_checkpoint(child.checkpoint_path)
        entry = checkpoint["miselbo"]
        assert entry["role"] == "q" and entry["seed"] == seed and args.seed == seed
        assert entry["parent_path"] == str(parent_result.checkpoint_path)
        assert (entry["decoder_fingerprint"] == entry["parent_fingerprint"]
                == model.decoder_fingerprint() == parent_result.decoder_fingerprint)
        optimised = load_raw(child.checkpoint_path)["optimizer"]["state"]
        assert len(optimised) == len(model.encoder_parameters())  # the decoder is not optimised
        torch.manual_seed(seed)
        initial = AutoEncoder(args, None, get_arch_cells(args.arch_instance)).state_dict()
        trained = model.state_dict()
        changed = [k for k, v in trained.items() if not is_decoder(k) and not torch.equal(v, initial[k])]
        assert len(changed) > 10
    assert "--param_check: decoder fingerprint unchanged after epoch 2" in (
        fast.save_dir / "log.txt").read_text()


def test_another_seed_gives_another_encoder(new_encoders):
    _, fast, plain = new_encoders
    state_2, state_3 = (load_raw(run.checkpoint_path)["state_dict"] for run in (fast, plain))
    encoder_keys = [key for key in state_2 if not is_decoder(key) and state_2[key].is_floating_point()]
    assert all(not torch.equal(state_2[key], state_3[key]) for key in encoder_keys
               if key.endswith("log_weight_norm"))


def test_new_encoder_against_a_checkpoint_written_by_nvae(tmp_path):
    folder = golden_case_dir("mnist_small")
    result = _new_encoder(tmp_path, folder, "q", 4, "--dataset", "mnist5k", "--batch_size", "8",
                          "--epochs", "1", "--num_train_examples", "16", "--num_test_examples", "8",
                          "--final_iw_samples", "2")
    golden = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)["state_dict"]
    state = load_raw(result.checkpoint_path)["state_dict"]
    assert all(torch.equal(state[k], golden[k]) for k in golden if is_decoder(k))
    args = load_raw(result.checkpoint_path)["args"]
    assert (args.num_channels_enc, args.num_latent_per_group, args.batch_size) == (8, 4, 8)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = loop.nelbo_loss
    calls = {"count": 0}

    def loss_turning_nan(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["count"] += 1
        if calls["count"] == 7:  # global step 6, the 3rd step of epoch 2
            terms = dataclasses.replace(terms, loss=terms.loss * float("nan"))
        return terms

    monkeypatch.setattr(loop, "nelbo_loss", loss_turning_nan)
    with pytest.raises(TrainingStopped) as stop:
        training.train(run_args(tmp_path, "nan", "--epochs", "3"))
    assert stop.value.exit_code == 3
    assert "the loss is nan at global step 6 (epoch 2, step 3 of 4)" in stop.value.message
    assert "last good checkpoint" in stop.value.message and "--cont_training" in stop.value.message
    checkpoint = read_checkpoint(tmp_path / "eval-nan")  # verifies the SHA-256 sidecar
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 4)
    load_nvae_checkpoint(tmp_path / "eval-nan")


def _refusal(capsys, argv, phrase):
    status = training.main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("train.py: error:") and "Traceback" not in err
    assert phrase in err, err


def test_refusals_exit_2_with_a_clear_message(parent, tmp_path, capsys):
    root, parent_result = parent
    empty = tmp_path / "empty"
    empty.mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    new_q = ["--train_new_q", "--p_and_q1_path"]
    cases = [
        (run_args(tmp_path, "x", "--dataset", "omniglot"), "this project does not support it"),
        (["--root", str(tmp_path), "--save", "x", *new_q, str(empty)], "holds no checkpoint.pt"),
        (["--root", str(tmp_path), "--save", "x", *new_q, str(parent_result.save_dir),
          "--num_latent_per_group", "3"], "--num_latent_per_group: 2 (parent"),
        (run_args(blocker, "x"), "cannot create the experiment folder"),
        (run_args(tmp_path, "x", "--epochs", "0"), "--epochs must be a whole number >= 1"),
        (run_args(tmp_path, "x", "--batch_size", "0"), "--batch_size must be a whole number >= 1"),
        (run_args(tmp_path, "x", "--cont_training"), "there is no checkpoint.pt to resume"),
        (["--root", str(root), "--save", "x", *new_q, str(parent_result.save_dir), "--save",
          "p_and_q1"], "the folder of the parent run"),
        (run_args(root, "p_and_q1"), "already holds a checkpoint.pt"),
        (run_args(tmp_path, "x", "--param_check"), "needs --train_new_q"),
        (run_args(tmp_path, "x", "--device", "gpu0"), "not a device name"),
        (run_args(tmp_path, "x", "--num_train_examples", "8"), "no full batch of 16"),
        (run_args(tmp_path, "x", "--device", "cpu", "--num_process_per_node", "1000000"),
         "--num_process_per_node 1000000 would start 1000000 processes"),
    ]
    for argv, phrase in cases:
        _refusal(capsys, argv, phrase)
    assert training.main(["--epochs", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err


# ----------------------------------------------------------------------------- NVAE compatibility


def test_importing_train_py_has_no_side_effects_and_exports_nvae_functions():
    code = ("import sys, os; before = set(os.listdir('.')); import train; "
            "assert set(os.listdir('.')) == before; "
            "assert all(callable(getattr(train, n)) for n in ('test', 'init_processes', "
            "'test_vae_fid', 'main')); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok" and done.stderr == "", done.stderr


def test_nvae_test_and_init_processes(parent):
    _, result = parent
    train_module = importlib.import_module("train")
    model, args, _ = load_nvae_checkpoint(result.checkpoint_path)
    small = argparse.Namespace(**dict(vars(args), num_test_examples=8))
    loaders = build_run_loaders(small, DistributedSetup(), torch.device("cpu"))
    lines = []
    logger = types.SimpleNamespace(info=lambda fmt, *values: lines.append(fmt % values))
    seen = {}

    def evaluate(run_args_):
        torch.manual_seed(0)
        seen["values"] = train_module.test(loaders.test, model, 3, run_args_, logger)
        seen["world"] = torch.distributed.get_world_size()

    train_module.init_processes(0, 1, evaluate, args)
    neg_log_p, nelbo = seen["values"]
    assert seen["world"] == 1 and not torch.distributed.is_initialized()
    assert 0 < neg_log_p < nelbo and "NELBO" in lines[0]


def test_test_vae_fid_needs_the_fid_package_and_uses_it(parent, monkeypatch, tmp_path):
    _, result = parent
    train_module = importlib.import_module("train")
    model, args, _ = load_nvae_checkpoint(result.checkpoint_path)
    args.fid_dir, args.batch_size = str(tmp_path), 4
    monkeypatch.setitem(sys.modules, "fid", None)
    with pytest.raises(RuntimeError, match="needs the `fid` package"):
        train_module.test_vae_fid(model, args, 8)

    class FakeInception(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            super().__init__()
            assert blocks == [3]

        def forward(self, images):  # [b, 3, H, W] -> [[b, 2048, 1, 1]]
            assert images.shape[1] == 3
            return [images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 2048, 1, 1)]

    def frechet(mu1, sigma1, mu2, sigma2):
        return float(((mu1 - mu2) ** 2).sum())

    fake = types.ModuleType("fid")
    monkeypatch.setitem(sys.modules, "fid", fake)
    monkeypatch.setitem(sys.modules, "fid.inception", types.SimpleNamespace(InceptionV3=FakeInception))
    monkeypatch.setitem(sys.modules, "fid.fid_score",
                        types.SimpleNamespace(calculate_frechet_distance=frechet))
    import numpy as np
    np.savez(tmp_path / "mnist.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    value = train_module.test_vae_fid(model, args, 8)
    assert value > 0


def test_data_dependent_init_touches_only_the_new_encoder():
    """res_elu convolutions initialise from data on their first forward: in a new encoder's model
    only the encoder's do; the copied decoder stays bit-identical through a training step."""
    from miselbo.nvae.layers import Conv2D
    from miselbo.training.new_encoder import Parent, adopt_decoder

    args = _tiny_args(arch_instance="res_elu")
    torch.manual_seed(0)
    parent_model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    parent_model(torch.ones(2, 1, 32, 32))  # the parent's own data init
    parent_state = {k: v.clone() for k, v in parent_model.state_dict().items()}
    torch.manual_seed(1)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    adopt_decoder(model, Parent(None, parent_model.decoder_fingerprint(),
                                {k: v for k, v in parent_state.items() if is_decoder(k)}))
    encoder_convs = [m for n, m in model.named_modules() if isinstance(m, Conv2D) and m.data_init
                     and not is_decoder(n)]
    before = [conv.log_weight_norm.detach().clone() for conv in encoder_convs]
    assert encoder_convs and not any(conv.init_done for conv in encoder_convs)
    parts = loop.StepParts(model=model, optimizer=build_optimizer(model.encoder_parameters(), 1e-2,
                                                                  3e-4, True),
                           grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
                           trainable=model.encoder_parameters(),
                           alpha=kl_balance_alpha(model.groups_per_scale),
                           layers=RegularisedLayers.encoder_of(model),
                           settings=TrainSettings.from_args(args), iterations_per_epoch=10,
                           device=torch.device("cpu"))
    x = (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    model.train()
    loop.train_step(parts, x, 3, StepGuard(StopRequests(announce=False), torch.device("cpu")))
    assert all(conv.init_done for conv in encoder_convs)
    assert all(not torch.equal(b, conv.log_weight_norm) for b, conv in zip(before, encoder_convs))
    for key, value in model.state_dict().items():
        if is_decoder(key):
            assert torch.equal(value, parent_state[key]), key
