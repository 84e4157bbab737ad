"""Size and eval-mode forward time of the paper's NVAE (NVAE's MNIST recipe) on this machine.

    python benchmarks/forward_speed.py [--batch_size 16] [--repeats 7] [--device cpu]

Architecture: the `paper` preset of miselbo/pipeline/presets.py (2 latent scales, 10 groups per scale with
ada_groups ([10, 5]), 20 latents per group, 32 channels, 2 cells per conditional in both towers,
SE, res_dist, no flows, 2 x 3 pre/post-processing cells), random weights (seed 0). Prints the
parameter count and the median / minimum of `repeats` timed forward passes after 2 warm-up ones,
then `RESULT {json}` (`parameters`: 33363134 for this architecture), stored in
benchmarks/results/forward_speed.json.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_record  # noqa: E402

from miselbo.runtime.cli import resolve_device  # noqa: E402
from miselbo.nvae.config import get_arch_cells  # noqa: E402
from miselbo.nvae.model import AutoEncoder  # noqa: E402
from miselbo.pipeline.presets import PAPER  # noqa: E402
from miselbo.runtime import flags  # noqa: E402


def timed_forward(model: AutoEncoder, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=flags.count_argument, default=16)
    parser.add_argument("--repeats", type=flags.count_argument, default=7)
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args(argv)
    device = resolve_device(options.device)
    args = PAPER.nvae_args(dataset="mnist")
    torch.manual_seed(0)
    model = AutoEncoder(args, None, get_arch_cells(args.arch_instance)).to(device).eval()
    x = (torch.rand(options.batch_size, 1, 32, 32, device=device) < 0.3).float()  # [B, 1, 32, 32]
    with torch.no_grad():
        for _ in range(2):
            model(x)
        times = [timed_forward(model, x) for _ in range(options.repeats)]
    result = {"preset": PAPER.name, "device": device.type, "threads": torch.get_num_threads(), "batch_size": options.batch_size,
              "repeats": options.repeats,
              "parameters": sum(p.numel() for p in model.parameters()),
              "state_dict_entries": len(model.state_dict()), "groups_per_scale": model.groups_per_scale,
              "forward_median_s": statistics.median(times), "forward_min_s": min(times)}
    print(f"{result['parameters']:,} parameters; eval forward at batch {options.batch_size} on "
          f"{device.type}: median {result['forward_median_s']:.3f} s, min {result['forward_min_s']:.3f} s")
    bench_record.save("forward_speed", result, device, argv=sys.argv[1:] if argv is None else list(argv))
    return 0


def render_markdown(record: dict) -> str:
    """The stored result's line for docs/benchmarks.md (benchmarks/report.py adds the header)."""
    result = record["result"]
    return (f"Preset `{result['preset']}`, random weights: {result['parameters']:,} parameters, "
            f"{result['state_dict_entries']:,} state_dict entries. Eval-mode forward pass at batch "
            f"{result['batch_size']} on {result['device']}: median {result['forward_median_s']:.3f} s, minimum "
            f"{result['forward_min_s']:.3f} s over {result.get('repeats', '?')} timed passes after 2 warm-up passes.\n")


if __name__ == "__main__":
    sys.exit(main())
