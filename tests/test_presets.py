"""The named configurations of miselbo.pipeline.presets, checked against sources that do not come from it:
the public NVAE implementation's parameter count, the shipped checkpoints, train.py's parser."""
from pathlib import Path

import pytest
import torch

from miselbo.nvae.config import NVAE_TRAIN_FLAGS, get_arch_cells
from miselbo.nvae.model import AutoEncoder
from miselbo.pipeline.presets import PAPER, PRESETS, get_preset
from miselbo.training.options import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
CATEGORY = {flag.name: flag.category for flag in NVAE_TRAIN_FLAGS}
# NVAE's published MNIST recipe, written out here independently of miselbo.pipeline.presets.
PUBLISHED_MNIST_RECIPE = dict(
    num_latent_scales=2, num_groups_per_scale=10, ada_groups=True, num_latent_per_group=20,
    num_channels_enc=32, num_channels_dec=32, num_preprocess_blocks=2, num_preprocess_cells=3,
    num_postprocess_blocks=2, num_postprocess_cells=3, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
    use_se=True, res_dist=True, num_nf=0, weight_decay_norm=1e-2, batch_size=200, epochs=400,
    fast_adamax=True, num_process_per_node=2)


def _flag_names(tokens) -> list[str]:
    return [token[2:] for token in tokens if token.startswith("--")]


def test_paper_builds_the_public_implementations_model_size():
    torch.manual_seed(0)
    args = PAPER.nvae_args()
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance))
    # 33,363,134 parameters and 2,016 state_dict entries: NVAE's own code on this recipe.
    assert sum(p.numel() for p in model.parameters()) == 33_363_134
    assert len(model.state_dict()) == 2016
    assert model.groups_per_scale == [10, 5]


def test_paper_is_the_published_recipe_flag_for_flag():
    args = build_parser().parse_args(["--dataset", PAPER.dataset, *PAPER.flags()])
    for name, value in PUBLISHED_MNIST_RECIPE.items():
        assert getattr(args, name) == value, name
    assert args.dataset == "mnist"
    assert set(_flag_names(PAPER.flags())) == set(PUBLISHED_MNIST_RECIPE)


@pytest.mark.parametrize("member", ["p_and_q1", "q2", "q3"])
def test_demo_is_what_the_shipped_ensemble_was_trained_with(member):
    # The shipped checkpoints record their train.py namespace (trusted: files of this repository);
    # every member, p_and_q1 and the new encoders alike, was trained with the preset's flags.
    stored = torch.load(REPO_ROOT / "models" / "mnist5k_demo" / member / "checkpoint.pt",
                        map_location="cpu", weights_only=False)["args"]
    demo = get_preset("demo")
    ours = build_parser().parse_args(["--dataset", "mnist", *demo.flags()])
    compared = [flag.name for flag in NVAE_TRAIN_FLAGS if flag.category in ("A", "C", "T")
                and flag.name not in ("cont_training", "seed")]
    compared += ["final_iw_samples", "epoch_test_examples"]
    for name in compared:
        assert getattr(ours, name) == getattr(stored, name), name
    assert stored.miselbo_dataset == demo.dataset
    assert stored.epochs == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_architecture_flags_change_the_model_and_schedule_flags_do_not(name):
    preset = PRESETS[name]
    assert all(CATEGORY[flag] in ("A", "C") for flag in _flag_names(preset.architecture))
    assert all(CATEGORY.get(flag, "ours") not in ("A", "C") for flag in _flag_names(preset.schedule))
    assert all(CATEGORY[flag] == "I" for flag in _flag_names(preset.launch))
    build_parser().parse_args(preset.flags())  # every token is a valid train.py flag


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="demo, paper, tiny"):
        get_preset("big")


@pytest.mark.parametrize("path", ["miselbo/pipeline/run.py", "benchmarks/forward_speed.py",
                                  "benchmarks/eval_speed.py", "benchmarks/train_speed.py"])
def test_no_other_module_spells_out_an_architecture(path):
    text = (REPO_ROOT / path).read_text()
    for flag in ("num_latent_per_group", "num_cell_per_cond_enc", "num_channels_dec"):
        assert flag not in text, f"{path} names {flag}: take the architecture from miselbo.pipeline.presets"
