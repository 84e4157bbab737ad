"""train.py's command line, flag inheritance, run rules, and the test routine's arithmetic."""
import argparse
import math

import pytest
import torch

from miselbo.errors import CheckpointError
from miselbo.errors import UserError
from miselbo.nvae.config import default_nvae_args
from miselbo.training import evaluation
from miselbo.training.launch import resume_command
from miselbo.training.options import (build_parser, explicit_flags, inherit_flags, to_nvae_namespace,
                                      validate_modes, validate_numbers)
from miselbo.training.settings import TrainSettings

OUR_FLAGS = {"train_new_q": False, "p_and_q1_path": None, "param_check": False, "device": "auto",
             "num_workers": 0, "trust_checkpoint": False, "final_iw_samples": 1000,
             "num_train_examples": None, "num_test_examples": None, "epoch_test_examples": None,
             "num_new_encoders": 1, "mixture_objective": "independent", "num_active": None,
             "include_parent_encoder": False, "precision": "auto"}


def test_every_nvae_flag_keeps_its_name_and_default_and_ours_are_documented():
    parsed = vars(build_parser().parse_args([]))
    assert {name: parsed[name] for name in vars(default_nvae_args())} == vars(default_nvae_args())
    assert parsed["dataset"] == "mnist"
    assert {name: parsed[name] for name in OUR_FLAGS} == OUR_FLAGS
    assert set(parsed) == set(vars(default_nvae_args())) | set(OUR_FLAGS)
    help_text = build_parser().format_help()
    for name in OUR_FLAGS:
        assert f"--{name}" in help_text
    assert "mnist5k" in help_text and "Exit status" in help_text


def test_dataset_accepts_mnist5k_and_the_namespace_records_both_names():
    args = to_nvae_namespace(build_parser().parse_args(["--dataset", "mnist5k", "--root", "/r",
                                                        "--save", "x"]))
    assert (args.dataset, args.miselbo_dataset, args.save) == ("mnist", "mnist5k", "/r/eval-x")


def test_explicit_flags_are_exactly_the_typed_ones():
    typed = explicit_flags(["--epochs", "3", "--use_se", "--seed", "1", "--dataset=mnist5k"])
    assert typed == {"epochs", "use_se", "seed", "dataset"}
    assert explicit_flags([]) == set()


def _stored_run(**overrides):
    values = dict(vars(default_nvae_args()), num_channels_enc=8, epochs=7, seed=5, dataset="mnist",
                  miselbo_dataset="mnist5k", save="/old/eval-run", root="/old", num_process_per_node=3,
                  num_train_examples=64, learning_rate=0.02)
    values.update(overrides)
    return argparse.Namespace(**values)


def _inherit(argv, new_encoder, stored=None):
    args = build_parser().parse_args(argv)
    return inherit_flags(args, explicit_flags(argv), stored or _stored_run(), new_encoder, "parent P")


def test_untyped_flags_come_from_the_stored_run_except_local_ones():
    merged = _inherit(["--save", "new", "--learning_rate", "0.005"], new_encoder=False)
    assert (merged.num_channels_enc, merged.epochs, merged.dataset) == (8, 7, "mnist5k")
    assert (merged.num_train_examples, merged.seed) == (64, 5)
    assert merged.learning_rate == 0.005  # typed: kept
    assert (merged.save, merged.root, merged.num_process_per_node) == ("new", "/tmp/nasvae/expr", 1)


def test_a_new_encoder_keeps_its_own_seed_and_miselbo_flags():
    stored = _stored_run(train_new_q=True, p_and_q1_path="/grand/parent", param_check=True)
    merged = _inherit(["--train_new_q", "--p_and_q1_path", "/old/eval-run"], True, stored)
    assert merged.seed == 1 and merged.p_and_q1_path == "/old/eval-run" and not merged.param_check
    assert merged.num_channels_enc == 8 and merged.epochs == 7


def test_typed_architecture_flags_must_match_the_stored_run():
    _inherit(["--num_channels_enc", "8", "--dataset", "mnist"], new_encoder=True)  # same: fine
    with pytest.raises(CheckpointError) as error:
        _inherit(["--num_channels_enc", "16", "--use_se"], new_encoder=True)
    message = str(error.value)
    assert "--num_channels_enc: 8 (parent P) vs 16 (command line)" in message
    assert "--use_se: False (parent P) vs True (command line)" in message
    assert "Leave these flags out" in message


@pytest.mark.parametrize("argv, flag", [
    (["--epochs", "0"], "--epochs"), (["--batch_size", "0"], "--batch_size"),
    (["--warmup_epochs=-1"], "--warmup_epochs"), (["--learning_rate", "nan"], "--learning_rate"),
    (["--learning_rate", "0"], "--learning_rate"), (["--weight_decay=-1e-4"], "--weight_decay"),
    (["--kl_anneal_portion", "1.5"], "--kl_anneal_portion"), (["--num_x_bits", "9"], "--num_x_bits"),
    (["--final_iw_samples", "0"], "--final_iw_samples"), (["--num_train_examples", "0"],
                                                           "--num_train_examples"),
    (["--node_rank", "1"], "--node_rank"), (["--seed=-1"], "--seed"),
    (["--weight_decay_norm_anneal"], "--weight_decay_norm_anneal")])
def test_bad_numbers_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(UserError, match=flag):
        validate_numbers(build_parser().parse_args(argv))


def test_counts_and_seeds_use_the_shared_flag_rules_of_the_evaluation():
    """train.py refuses counts and seeds with miselbo.runtime.flags' words, and a bool is no count."""
    from miselbo.runtime import flags
    from miselbo.training import options
    assert options.MAX_SEED is flags.MAX_SEED
    for argv, words in [(["--epochs", "0"], "--epochs must be a whole number >= 1, got 0."),
                        (["--num_test_examples", "0"], "--num_test_examples must be a whole number >= 1"),
                        (["--seed", str(flags.MAX_SEED + 1)], f"--seed must lie in 0 .. {flags.MAX_SEED}")]:
        with pytest.raises(UserError) as refused:
            validate_numbers(build_parser().parse_args(argv))
        assert words in str(refused.value)
    args = build_parser().parse_args(["--train_new_q", "--p_and_q1_path", "x"])
    for bad in (0, True):
        args.num_new_encoders = bad
        with pytest.raises(UserError, match="--num_new_encoders must be a whole number >= 1"):
            validate_modes(args)


@pytest.mark.parametrize("argv, phrase", [(["--train_new_q"], "needs --p_and_q1_path"),
                                          (["--p_and_q1_path", "x"], "only used with --train_new_q"),
                                          (["--param_check"], "needs --train_new_q")])
def test_meaningless_miselbo_combinations_are_refused(argv, phrase):
    with pytest.raises(UserError, match=phrase):
        validate_modes(build_parser().parse_args(argv))


def _settings(epochs):
    args = build_parser().parse_args(["--epochs", str(epochs)])
    return TrainSettings.from_args(args)


def test_validation_and_checkpoint_epochs_follow_nvae():
    short, long = _settings(7), _settings(200)
    assert [e for e in range(7) if short.validates_after(e)] == list(range(7))
    assert [e for e in range(200) if long.validates_after(e)] == list(range(0, 200, 20)) + [199]
    assert [e for e in range(7) if short.checkpoints_after(e)] == list(range(7))
    assert [e for e in range(200) if long.checkpoints_after(e)] == list(range(0, 200, 2)) + [199]
    assert not short.regularised and TrainSettings.from_args(
        build_parser().parse_args(["--weight_decay_norm", "0.1"])).regularised


def test_resume_command_adds_cont_training_once():
    assert resume_command(["--save", "a b"]) == "python train.py --save 'a b' --cont_training"
    assert resume_command(["--cont_training"]) == "python train.py --cont_training"


class ScriptedModel:
    """A stand-in whose k-th call returns rows with log p(x|z) = 0 and log q - log p = -(row index
    + 10 k) / 100, so the importance weights and KLs are known in closed form."""
    crop_output = False

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        rows = x.shape[0]
        offsets = (torch.arange(rows, dtype=torch.float64) + 10 * self.calls) / 100
        self.calls += 1
        logits = torch.full_like(x, 30.0)  # Bernoulli(sigmoid(30)) of x = 1: log p ~ -9e-14 per pixel
        log_q = -offsets
        return logits, log_q, torch.zeros_like(log_q), [offsets, offsets], None

    def decoder_output(self, logits):
        return torch.distributions.Bernoulli(logits=logits)


def test_batch_bounds_combine_all_chunks_of_samples():
    x = torch.ones(3, 1, 2, 2)  # B = 3
    model = ScriptedModel()
    nelbo, neg_log_p = evaluation.batch_bounds(model, x, num_samples=5, max_rows=6)  # passes of 2, 2, 1
    assert model.calls == 3
    weights = []  # [K, B]: pass k holds draws 2k, 2k+1 (or 4); row r = draw * B + b
    for call, count in enumerate((2, 2, 1)):
        rows = torch.arange(count * 3, dtype=torch.float64) + 10 * call
        weights.append((rows / 100).view(count, 3))  # log w = -rec - log q + log p = offset
    log_w = torch.cat(weights)
    rec = -4 * torch.nn.functional.logsigmoid(torch.tensor(30.0, dtype=torch.float64))
    torch.testing.assert_close(neg_log_p, -(torch.logsumexp(log_w - rec, 0) - math.log(5)))
    torch.testing.assert_close(nelbo, rec + 2 * log_w.mean(dim=0), rtol=0, atol=1e-6)


def test_samples_per_pass():
    assert evaluation.samples_per_pass(16, 1000, 512) == [32] * 31 + [8]
    assert evaluation.samples_per_pass(600, 3, 512) == [1, 1, 1]
    assert evaluation.samples_per_pass(4, 10, 512) == [10]
