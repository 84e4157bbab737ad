"""Tiny NVAE ensembles for the evaluation tests.

An ensemble here is built like a trained one: S models from different seeds, the decoder entries of
member 0's state_dict copied into the others (`is_decoder_key`), each saved as an NVAE checkpoint
with a `miselbo` entry.
"""
from pathlib import Path

import pytest
import torch

from miselbo.storage.checkpoints import save_nvae_checkpoint
from miselbo.nvae.config import default_nvae_args, get_arch_cells
from miselbo.nvae.model import AutoEncoder, is_decoder_key

TINY = dict(dataset="mnist", num_channels_enc=4, num_channels_dec=4, num_latent_scales=2,
            num_groups_per_scale=2, num_latent_per_group=2, num_preprocess_blocks=1,
            num_preprocess_cells=2, num_postprocess_blocks=1, num_postprocess_cells=2, use_se=True,
            res_dist=True, batch_size=8)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run many small ops: one thread is faster, and it stays fast when other jobs load
    the machine (two OpenMP threads on an oversubscribed CPU made a tiny conv 100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_args(**overrides):
    return default_nvae_args(**dict(TINY, **overrides))


def build_model(args, seed: int) -> AutoEncoder:
    torch.manual_seed(seed)
    return AutoEncoder(args, None, get_arch_cells(args.arch_instance))


def make_members(num_members: int, seed: int = 0, **overrides):
    """(args, [AutoEncoder] * S in eval mode): own encoders, member 0's decoder weights copied in."""
    args = tiny_args(**overrides)
    models = [build_model(args, seed + index) for index in range(num_members)]
    decoder_state = {key: value for key, value in models[0].state_dict().items() if is_decoder_key(key)}
    for model in models[1:]:
        model.load_state_dict(decoder_state, strict=False)
    return args, [model.eval() for model in models]


def save_members(folder: Path, args, models, seed: int = 0) -> list[Path]:
    """Save the models as run folders p_and_q1, q2, ... (checkpoint.pt with a miselbo entry)."""
    paths = []
    parent_fingerprint = models[0].decoder_fingerprint()
    for index, model in enumerate(models):
        run = folder / ("p_and_q1" if index == 0 else f"q{index + 1}")
        run.mkdir(parents=True, exist_ok=True)
        entry = {"decoder_fingerprint": model.decoder_fingerprint(), "role": "p_and_q" if index == 0 else "q",
                 "seed": seed + index, "parent_path": None if index == 0 else str(paths[0].parent),
                 "parent_fingerprint": None if index == 0 else parent_fingerprint}
        paths.append(save_nvae_checkpoint(run, model, args, miselbo=entry))
    return paths


def binary_batch(model: AutoEncoder, batch: int, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = model.config.input_size
    shape = (batch, model.config.input_channels, size, size)
    if model.config.input_channels == 1:
        return (torch.rand(shape, generator=generator) < 0.4).float()
    return torch.randint(0, 256, shape, generator=generator).float() / 255
