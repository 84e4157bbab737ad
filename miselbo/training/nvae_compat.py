"""The functions NVAE's evaluate.py imports from train.py, with NVAE's signatures.

* `test(valid_queue, model, num_samples, args, logging)` -> (−log p, NELBO), nats per image;
* `init_processes(rank, size, fn, args)`: join a process group (gloo on CPU, NCCL on CUDA, even
  for one process, as NVAE's evaluate.py expects), run fn(args), leave the group;
* `test_vae_fid(model, args, total_fid_samples)`: FID of prior samples (temperature 1, images =
  the output distribution's mean) against reference statistics, with the `fid` package of an
  NVAE clone (pytorch-fid's InceptionV3 and calculate_frechet_distance). Reference statistics are
  read from `<args.fid_dir>/<args.dataset>.npz` (arrays `mu`, `sigma`, pytorch-fid's format).
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from miselbo.runtime import distributed
from miselbo.nvae.distributions import output_image
from miselbo.training.evaluation import evaluate_bounds

NVAE_MASTER_PORT = 6020
FID_DIMS = 2048


def test(valid_queue, model, num_samples: int, args, logging):
    """NVAE's test routine (docs/nvae.md 8.6); returns (neg_log_p, nelbo) in nats per image."""
    result = evaluate_bounds(valid_queue, model, num_samples, args.num_x_bits)
    if logging is not None:
        logging.info("test (%d importance samples): NELBO %f, -log p %f (nats per image)",
                     num_samples, result.nelbo, result.neg_log_p)
    return result.neg_log_p, result.nelbo


def init_processes(rank: int, size: int, fn, args) -> None:
    """NVAE's process start-up: rendezvous at args.master_address, run fn(args), clean up."""
    os.environ["MASTER_ADDR"] = args.master_address
    if "MASTER_PORT" not in os.environ:
        port = NVAE_MASTER_PORT if size > 1 else distributed.free_port(args.master_address)
        os.environ["MASTER_PORT"] = str(port)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(getattr(args, "local_rank", 0))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                            rank=rank, world_size=size, timeout=distributed.DEFAULT_TIMEOUT)
    try:
        fn(args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fid_tools():
    """(InceptionV3, calculate_frechet_distance) from the NVAE clone's `fid` package."""
    try:
        inception = importlib.import_module("fid.inception")
        score = importlib.import_module("fid.fid_score")
        return inception.InceptionV3, score.calculate_frechet_distance
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"test_vae_fid needs the `fid` package of an NVAE clone (fid/inception.py "
                           f"with InceptionV3, fid/fid_score.py with calculate_frechet_distance) on "
                           f"the Python path; it could not be used: {err}") from err


@torch.no_grad()
def _generated_activations(model, inception, count: int, batch_size: int) -> torch.Tensor:
    """Inception pool features [count, 2048] of `count` prior samples."""
    features = []
    for start in range(0, count, batch_size):
        logits = model.sample(min(batch_size, count - start), 1.0)
        images = output_image(model.decoder_output(logits), mean=True)  # [b, C, H, W] in [0, 1]
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features.append(inception(images)[0].flatten(1).double())
    return torch.cat(features)


def test_vae_fid(model, args, total_fid_samples: int) -> float:
    """FID of `total_fid_samples` prior samples (split over the processes) against the reference."""
    inception_class, frechet_distance = _fid_tools()
    reference = Path(args.fid_dir) / f"{args.dataset}.npz"
    if not reference.is_file():
        raise RuntimeError(f"test_vae_fid: reference statistics {reference} not found (an .npz with "
                           f"arrays mu and sigma of the data set's Inception features).")
    device = next(model.parameters()).device
    inception = inception_class([inception_class.BLOCK_INDEX_BY_DIM[FID_DIMS]]).to(device).eval()
    per_process = math.ceil(total_fid_samples / distributed.world_size())
    features = _generated_activations(model, inception, per_process, args.batch_size)
    features = distributed.all_gather_cat(features).cpu().numpy()  # [total, 2048]
    stats = np.load(reference)
    return float(frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False),
                                  stats["mu"], stats["sigma"]))
