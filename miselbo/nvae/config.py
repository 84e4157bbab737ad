"""NVAE's configuration surface: train.py flags, architecture tables, dataset sizes (docs/nvae.md
1.1, 2.1, 2.2, 2.4, 6.1), and the frozen `ModelConfig` the model is built from.

The argparse namespace is NVAE's external format (command line, checkpoints). `ModelConfig.from_args`
converts it once; the model reads only the dataclass.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, fields
from typing import Any

CHANNEL_MULT = 2  # every down-sampling cell doubles the width, every up-sampling cell halves it

# ----------------------------------------------------------------------------- groups per scale


def groups_per_scale(num_scales: int, num_groups: int, adaptive: bool, divider: int = 2,
                     minimum: int = 1) -> list[int]:
    """Groups of each latent scale, finest first: n_0 = num_groups, n_{s+1} = max(minimum, n_s // divider)
    when adaptive, else all num_groups (docs/nvae.md 2.1)."""
    if num_scales < 1 or num_groups < 1:
        raise ValueError(f"groups_per_scale: num_scales ({num_scales}) and num_groups ({num_groups}) "
                         f"must be >= 1")
    if adaptive and (divider < 1 or minimum < 1):
        raise ValueError(f"groups_per_scale: divider ({divider}) and minimum ({minimum}) must be >= 1")
    counts = [num_groups]
    for _ in range(num_scales - 1):
        counts.append(max(minimum, counts[-1] // divider) if adaptive else num_groups)
    return counts


# ----------------------------------------------------------------------------- datasets

BERNOULLI_DATASETS = ("mnist", "omniglot")
CROPPED_DATASETS = ("mnist", "omniglot", "stacked_mnist")
_SIZE_SUFFIX_PREFIXES = ("celeba", "imagenet", "lsun")
_FIXED_INPUT_SIZES = {"mnist": 32, "omniglot": 32, "cifar10": 32, "ffhq": 256}


def _unsupported(helper: str, dataset: str) -> ValueError:
    return ValueError(f"{helper}: dataset {dataset!r} is not supported (mnist, omniglot, cifar10, ffhq, "
                      f"and names celeba_<size>, imagenet_<size>, lsun_<...>_<size> are)")


def input_size(dataset: str) -> int:
    """Side length of the (square) model input (docs/nvae.md 2.2); mnist/omniglot are padded to 32."""
    if dataset in _FIXED_INPUT_SIZES:
        return _FIXED_INPUT_SIZES[dataset]
    if dataset.startswith(_SIZE_SUFFIX_PREFIXES):
        suffix = dataset.rsplit("_", 1)[-1]
        if suffix.isdigit() and int(suffix) > 0:
            return int(suffix)
    raise _unsupported("input_size", dataset)


def input_channels(dataset: str) -> int:
    """1 for mnist/omniglot, 3 for every colour dataset."""
    input_size(dataset)  # validates the name
    return 1 if dataset in BERNOULLI_DATASETS else 3


def output_channels(dataset: str, num_mixture_dec: int) -> int:
    """Channels of the output head: 1 (Bernoulli), 6 (Normal decoder, M = 1) or 10 M (logistic mixture)."""
    input_size(dataset)
    if dataset in BERNOULLI_DATASETS:
        return 1
    if num_mixture_dec < 1:
        raise ValueError(f"output_channels: num_mixture_dec must be >= 1, got {num_mixture_dec}")
    return 6 if num_mixture_dec == 1 else 10 * num_mixture_dec


def crop_output(dataset: str) -> bool:
    """Whether reconstruction terms use only the central 28x28 of the 32x32 canvas."""
    return dataset in CROPPED_DATASETS


def num_output_dims(dataset: str) -> int:
    """Number of data dimensions for bits/dim: 784 (mnist/omniglot) or 3 * size^2 (docs/nvae.md 2.2)."""
    if dataset in BERNOULLI_DATASETS:
        return 28 * 28
    return 3 * input_size(dataset) ** 2


# ----------------------------------------------------------------------------- architecture tables

def _table(normal_enc, down_enc, normal_dec, up_dec, normal_pre, down_pre, normal_post, up_post):
    return {"normal_enc": normal_enc, "down_enc": down_enc, "normal_dec": normal_dec, "up_dec": up_dec,
            "normal_pre": normal_pre, "down_pre": down_pre, "normal_post": normal_post,
            "up_post": up_post, "ar_nn": [""]}


def _uniform_table(ops):
    return _table(*([list(ops)] * 8))


_BNSWISH2 = ["res_bnswish", "res_bnswish"]
_E6K5 = ["mconv_e6k5g0"]
_E3K5 = ["mconv_e3k5g0"]
ARCH_CELLS = {
    "res_elu": _uniform_table(["res_elu", "res_elu"]),
    "res_bnelu": _uniform_table(["res_bnelu", "res_bnelu"]),
    "res_bnswish": _uniform_table(_BNSWISH2),
    "mbconv_sep": _table(_E6K5, _E6K5, _E6K5, _E6K5, _E3K5, _E3K5, _E3K5, _E3K5),
    "mbconv_sep11": _table(*([["mconv_e6k11g0"]] * 4), _E3K5, _E3K5, _E3K5, _E3K5),
    "res_mbconv": _table(_BNSWISH2, _BNSWISH2, _E6K5, _E6K5, _BNSWISH2, _BNSWISH2, _E3K5, _E3K5),
    "res53_mbconv": _table(*([["res_bnswish5", "res_bnswish"]] * 2), _E6K5, _E6K5,
                           *([["res_bnswish5", "res_bnswish"]] * 2), _E3K5, _E3K5),
    "res35_mbconv": _table(*([["res_bnswish", "res_bnswish5"]] * 2), _E6K5, _E6K5,
                           *([["res_bnswish", "res_bnswish5"]] * 2), _E3K5, _E3K5),
    "res55_mbconv": _table(*([["res_bnswish5", "res_bnswish5"]] * 2), _E6K5, _E6K5,
                           *([["res_bnswish5", "res_bnswish5"]] * 2), _E3K5, _E3K5),
    "mbconv_res": _table(_E6K5, _E6K5, _BNSWISH2, _BNSWISH2, _E3K5, _E3K5, _BNSWISH2, _BNSWISH2),
    "mbconv_den": _table(_E6K5, _E6K5, _E6K5, _E6K5, *([["mconv_e3k5g8"]] * 4)),
}
# NVAE lists this table but its ops (mconv_e6k9g0, mconv_e3k9g0) do not exist, so it cannot be built.
UNBUILDABLE_ARCHS = ("res_mbconv9",)


def get_arch_cells(name: str) -> dict[str, list[str]]:
    """A fresh copy of the cell-type -> op-list table for arch_instance `name` (docs/nvae.md 2.4)."""
    if name in UNBUILDABLE_ARCHS:
        raise ValueError(f"arch_instance {name!r} cannot be built: NVAE's table names ops "
                         f"(mconv_e6k9g0, mconv_e3k9g0) that its op table lacks")
    if name not in ARCH_CELLS:
        raise ValueError(f"unknown arch_instance {name!r}; choose one of {sorted(ARCH_CELLS)}")
    return copy.deepcopy(ARCH_CELLS[name])


# ----------------------------------------------------------------------------- train.py flags

@dataclass(frozen=True)
class TrainFlag:
    """One NVAE train.py flag. type None marks a store_true switch. category: A changes the
    parameters, C the computation only, T the training procedure, I infrastructure (docs/nvae.md 1.1)."""
    name: str
    type: Any
    default: Any
    help: str
    category: str
    choices: tuple[str, ...] | None = None


NVAE_DATASETS = ("cifar10", "mnist", "omniglot", "celeba_64", "celeba_256", "imagenet_32", "ffhq",
                 "lsun_bedroom_128", "stacked_mnist", "lsun_church_128", "lsun_church_64")
_F = TrainFlag
NVAE_TRAIN_FLAGS = (
    _F("root", str, "/tmp/nasvae/expr", "parent directory of experiment folders", "I"),
    _F("save", str, "exp", "experiment id; train.py replaces it by root + '/eval-' + save", "I"),
    _F("dataset", str, "mnist", "dataset: data loader, input/output channels and likelihood", "A",
       NVAE_DATASETS),
    _F("data", str, "/tmp/nasvae/data", "dataset root folder", "I"),
    _F("batch_size", int, 200, "batch size per process", "T"),
    _F("learning_rate", float, 1e-2, "peak learning rate", "T"),
    _F("learning_rate_min", float, 1e-4, "floor of the cosine schedule", "T"),
    _F("weight_decay", float, 3e-4, "L2 coefficient given to Adamax", "T"),
    _F("weight_decay_norm", float, 0.0, "coefficient of the spectral + BN regulariser (final value "
       "when annealing)", "T"),
    _F("weight_decay_norm_init", float, 10.0, "initial regulariser coefficient when annealing", "T"),
    _F("weight_decay_norm_anneal", None, False, "anneal the regulariser coefficient geometrically "
       "with the KL weight", "T"),
    _F("epochs", int, 200, "number of epochs", "T"),
    _F("warmup_epochs", int, 5, "epochs of linear learning-rate warm-up", "T"),
    _F("fast_adamax", None, False, "use the stacked Adamax implementation (same maths)", "T"),
    _F("arch_instance", str, "res_mbconv", "name of the cell-type -> operation table", "A"),
    _F("kl_anneal_portion", float, 0.3, "fraction of all iterations over which the KL weight rises to 1",
       "T"),
    _F("kl_const_portion", float, 0.0001, "fraction of all iterations before the KL weight rises", "T"),
    _F("kl_const_coeff", float, 0.0001, "lower bound of the KL weight", "T"),
    _F("num_nf", int, 0, "paired autoregressive flow cells per latent group (0: no flows)", "A"),
    _F("num_x_bits", int, 8, "bits the input is quantised to (also the logistic mixture's bins)", "C"),
    _F("num_latent_scales", int, 1, "number of spatial scales holding latent groups", "A"),
    _F("num_groups_per_scale", int, 10, "latent groups per scale (at the finest scale with "
       "--ada_groups)", "A"),
    _F("num_latent_per_group", int, 20, "channels of each latent group", "A"),
    _F("ada_groups", None, False, "halve the number of groups at each coarser scale", "A"),
    _F("min_groups_per_scale", int, 1, "lower bound on groups per scale with --ada_groups", "A"),
    _F("num_channels_enc", int, 32, "base width of the bottom-up network", "A"),
    _F("num_preprocess_blocks", int, 2, "down-sampling pre-processing blocks", "A"),
    _F("num_preprocess_cells", int, 3, "cells per pre-processing block", "A"),
    _F("num_cell_per_cond_enc", int, 1, "encoder cells between consecutive latent groups", "A"),
    _F("num_channels_dec", int, 32, "base width of the top-down network", "A"),
    _F("num_postprocess_blocks", int, 2, "up-sampling post-processing blocks", "A"),
    _F("num_postprocess_cells", int, 3, "cells per post-processing block", "A"),
    _F("num_cell_per_cond_dec", int, 1, "decoder cells between consecutive latent groups", "A"),
    _F("num_mixture_dec", int, 10, "logistic mixture components for colour data (1: Normal decoder)",
       "A"),
    _F("use_se", None, False, "add squeeze-and-excitation to every residual cell", "A"),
    _F("res_dist", None, False, "residual posterior: raw posterior parameters are the prior's plus "
       "the encoder's (groups >= 1)", "C"),
    _F("cont_training", None, False, "resume from <save>/checkpoint.pt", "T/I"),
    _F("num_proc_node", int, 1, "number of nodes", "I"),
    _F("node_rank", int, 0, "index of this node", "I"),
    _F("local_rank", int, 0, "rank within the node", "I"),
    _F("global_rank", int, 0, "global rank", "I"),
    _F("num_process_per_node", int, 1, "processes (GPUs) per node", "I"),
    _F("master_address", str, "127.0.0.1", "rendezvous address", "I"),
    _F("seed", int, 1, "random seed", "T"),
)
del _F


def add_nvae_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every NVAE train.py flag of NVAE_TRAIN_FLAGS to `parser` (NVAE's names and defaults)."""
    for flag in NVAE_TRAIN_FLAGS:
        option = f"--{flag.name}"
        if flag.type is None:
            parser.add_argument(option, action="store_true", default=flag.default, help=flag.help)
        else:
            parser.add_argument(option, type=flag.type, default=flag.default, choices=flag.choices,
                                help=flag.help)
    return parser


def default_nvae_args(**overrides) -> argparse.Namespace:
    """NVAE's train.py defaults as a Namespace, with `overrides` (flag names) applied."""
    args = add_nvae_train_arguments(argparse.ArgumentParser(add_help=False)).parse_args([])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise ValueError(f"default_nvae_args: unknown NVAE flag(s) {unknown}")
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


# ----------------------------------------------------------------------------- model config

@dataclass(frozen=True)
class ModelConfig:
    """Every setting the AutoEncoder reads (categories A and C of docs/nvae.md 1.1), validated once."""
    dataset: str
    arch_instance: str
    num_channels_enc: int
    num_channels_dec: int
    num_latent_scales: int
    num_groups_per_scale: int
    num_latent_per_group: int
    ada_groups: bool
    min_groups_per_scale: int
    num_preprocess_blocks: int
    num_preprocess_cells: int
    num_postprocess_blocks: int
    num_postprocess_cells: int
    num_cell_per_cond_enc: int
    num_cell_per_cond_dec: int
    num_mixture_dec: int
    num_x_bits: int
    num_nf: int
    use_se: bool
    res_dist: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelConfig":
        """Read the fields from NVAE's namespace; missing attributes are an error (fill old
        checkpoints' defaults before, as miselbo.storage.checkpoints does)."""
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if not hasattr(args, name)]
        if missing:
            raise ValueError(f"ModelConfig.from_args: the NVAE args lack {missing}")
        config = cls(**{name: getattr(args, name) for name in names})
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the flag when a setting cannot give a working model."""
        for name in ("num_channels_enc", "num_channels_dec", "num_latent_scales", "num_groups_per_scale",
                     "num_latent_per_group", "num_preprocess_cells", "num_postprocess_cells",
                     "num_x_bits"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig: --{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_preprocess_blocks", "num_postprocess_blocks", "num_cell_per_cond_enc",
                     "num_cell_per_cond_dec", "num_nf"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig: --{name} must be >= 0, got {getattr(self, name)}")
        if self.num_preprocess_blocks != self.num_postprocess_blocks:
            raise ValueError(f"ModelConfig: --num_preprocess_blocks ({self.num_preprocess_blocks}) must "
                             f"equal --num_postprocess_blocks ({self.num_postprocess_blocks}), or the "
                             f"output image has the wrong size")
        if self.vanilla_vae and self.num_channels_enc != self.num_channels_dec:
            raise ValueError("ModelConfig: the single-group (vanilla) model needs --num_channels_enc == "
                             "--num_channels_dec (its stem_decoder outputs the encoder width)")
        output_channels(self.dataset, self.num_mixture_dec)  # validates dataset and mixture count
        if self.latent_size < 1 or self.input_size % self.spatial_scaling != 0:
            raise ValueError(f"ModelConfig: input size {self.input_size} of {self.dataset!r} is not "
                             f"divisible by 2^(num_preprocess_blocks + num_latent_scales - 1) = "
                             f"{self.spatial_scaling}")

    @property
    def groups_per_scale(self) -> tuple[int, ...]:
        """Groups of each scale, finest first (NVAE order)."""
        return tuple(groups_per_scale(self.num_latent_scales, self.num_groups_per_scale, self.ada_groups,
                                      minimum=self.min_groups_per_scale))

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_scale)

    @property
    def vanilla_vae(self) -> bool:
        return self.num_latent_scales == 1 and self.num_groups_per_scale == 1

    @property
    def input_size(self) -> int:
        return input_size(self.dataset)

    @property
    def input_channels(self) -> int:
        return input_channels(self.dataset)

    @property
    def output_channels(self) -> int:
        return output_channels(self.dataset, self.num_mixture_dec)

    @property
    def crop_output(self) -> bool:
        return crop_output(self.dataset)

    @property
    def spatial_scaling(self) -> int:
        """c_scaling = spatial_scaling = 2^(P + S - 1) (docs/nvae.md 6.1)."""
        return CHANNEL_MULT ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def latent_size(self) -> int:
        """Side of the coarsest latent grid (and of prior_ftr0)."""
        return self.input_size // self.spatial_scaling
