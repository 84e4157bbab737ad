"""MISELBO for your own model: classical VI of a 2-D target with a known normaliser.

The target is an unnormalised mixture of three Gaussians with unequal weights, so log Z is known.
S full-covariance Gaussians are fitted independently (own seed, own random start) by maximising the
reparameterised ELBO with Adam; then the ensemble is scored with the generic evaluator and every
estimator is printed next to the true log Z, for each L asked for, as mean +- standard error over
independent replications. "best IWELBO S*L" is the compute-matched baseline: each member's IWELBO
with S * L of its own samples (the L that MISELBO used plus (S - 1) * L more), the best member
chosen on these replications. A PNG shows the target's contours with the S fitted components.

    python examples/own_model.py                      # S = 4, L = 1 and 100, 1500 steps
    python examples/own_model.py --S 6 --L 1 10 1000 --out ensemble.png
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch

from miselbo import estimators as est
from miselbo.estimators.generic import compute_log_weights, compute_own_log_weights

# The target: sum_k weight_k N(z; mean_k, cov_k), weights not summing to one, so Z = sum_k weight_k.
TARGET_WEIGHTS = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
TARGET_MEANS = torch.tensor([[-2.5, 0.0], [2.0, 2.0], [1.5, -2.5]], dtype=torch.float64)
TARGET_COVS = torch.tensor(
    [[[1.0, 0.4], [0.4, 0.6]], [[0.5, -0.2], [-0.2, 0.8]], [[0.4, 0.0], [0.0, 0.4]]], dtype=torch.float64
)
LOG_Z = math.log(TARGET_WEIGHTS.sum().item())


def log_target(x, z):
    """Unnormalised log density log sum_k weight_k N(z; mean_k, cov_k): z [n, 2] -> [n] (x unused)."""
    components = torch.distributions.MultivariateNormal(TARGET_MEANS, TARGET_COVS)
    return torch.logsumexp(components.log_prob(z[..., None, :]) + TARGET_WEIGHTS.log(), dim=-1)


@dataclass
class GaussianMember:
    """A fitted q_s(z) = N(loc, scale_tril scale_tril^T); ignores x (classical VI)."""

    loc: torch.Tensor  # [2]
    scale_tril: torch.Tensor  # [2, 2]

    def distribution(self):
        return torch.distributions.MultivariateNormal(self.loc, scale_tril=self.scale_tril)

    def sample(self, x, num_samples):
        return self.distribution().sample((num_samples,))  # [n, 2]

    def log_prob(self, z, x):
        return self.distribution().log_prob(z)  # [n]


def scale_tril_from(raw_diag, raw_offdiag):
    """Lower-triangular Cholesky factor with a positive diagonal (softplus): [2, 2]."""
    diag = torch.nn.functional.softplus(raw_diag) + 1e-4
    return torch.diag(diag) + torch.diag(raw_offdiag, diagonal=-1)


def fit_member(seed: int, steps: int, batch: int = 64, lr: float = 0.05) -> GaussianMember:
    """Maximise ELBO = E_q[log_target(z) - log q(z)] by reparameterised gradients, from a random start."""
    generator = torch.Generator().manual_seed(seed)
    loc = (8.0 * torch.rand(2, generator=generator, dtype=torch.float64) - 4.0).requires_grad_()
    raw_diag = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    raw_offdiag = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([loc, raw_diag, raw_offdiag], lr=lr)
    for _ in range(steps):
        q = torch.distributions.MultivariateNormal(loc, scale_tril=scale_tril_from(raw_diag, raw_offdiag))
        noise = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
        z = loc + noise @ q.scale_tril.T  # [batch, 2], reparameterised
        negative_elbo = (q.log_prob(z) - log_target(None, z)).mean()
        optimizer.zero_grad()
        negative_elbo.backward()
        optimizer.step()
    return GaussianMember(loc.detach(), scale_tril_from(raw_diag, raw_offdiag).detach())


ESTIMATORS = {
    "avg ELBO": est.average_elbo,
    "MISELBO": est.miselbo,
    "pooled": est.pooled_mis_bound,
    "avg IWELBO": est.average_iwelbo,
    "JSD": lambda log_p, log_q: est.jsd(log_q),
}


MATCHED = "best IWELBO S*L"


def estimate(members, num_samples: int, replications: int, chunk_size: int) -> dict[str, torch.Tensor]:
    """Every estimator on `replications` independent sets of L samples: name -> [R]."""
    log_p, log_q = compute_log_weights(members, log_target, None, num_samples * replications, chunk_size)
    S = len(members)
    # The R * L i.i.d. samples of each member split into R independent replications of L samples.
    log_p = log_p.reshape(S, replications, num_samples).movedim(1, 0)  # [R, S, L]
    log_q = log_q.reshape(S, replications, num_samples, S).movedim(1, 0)  # [R, S, L, S]
    values = {name: estimator(log_p, log_q) for name, estimator in ESTIMATORS.items()}
    values[MATCHED] = best_matched_iwelbo(members, log_p, log_q, chunk_size)
    return values


def best_matched_iwelbo(members, log_p, log_q, chunk_size: int) -> torch.Tensor:
    """The best member's IWELBO with S * L own samples per replication: [R] (best by mean over R)."""
    replications, S, num_samples = log_p.shape
    log_w = log_p - torch.diagonal(log_q, dim1=-3, dim2=-1).transpose(-1, -2)  # [R, S, L], reused
    if S > 1:
        extra = compute_own_log_weights(members, log_target, None, (S - 1) * num_samples * replications, chunk_size)
        extra = extra.reshape(S, replications, (S - 1) * num_samples).movedim(1, 0)  # [R, S, (S-1) L]
        log_w = torch.cat([log_w, extra], dim=-1)  # [R, S, S L]
    matched = est.iwelbo_from_log_weights(log_w)  # [R, S]
    return matched[:, matched.mean(dim=0).argmax()]


def format_table(results: dict[int, dict[str, torch.Tensor]]) -> str:
    """One row per L: mean +- standard error of each estimator, then log Z."""
    names = [*ESTIMATORS, MATCHED]
    header = f"{'L':>6} | " + " | ".join(f"{name:>17}" for name in names) + f" | {'log Z':>7}"
    lines = [header, "-" * len(header)]
    for num_samples, values in results.items():
        cells = []
        for name in names:
            replicated = values[name]
            stderr = replicated.std().item() / math.sqrt(len(replicated))
            cells.append(f"{replicated.mean().item():>8.4f} +- {stderr:.4f}")
        lines.append(f"{num_samples:>6} | " + " | ".join(cells) + f" | {LOG_Z:>7.4f}")
    return "\n".join(lines)


def plot(members, path: str) -> None:
    """Target contours and each member's 1- and 2-sigma ellipses, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    grid = torch.linspace(-6.0, 6.0, 200, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1).reshape(-1, 2)  # [200*200, 2]
    density = log_target(None, z).exp().reshape(200, 200)
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.contourf(grid, grid, density, levels=20, cmap="Greys")
    for index, member in enumerate(members):
        cov = member.scale_tril @ member.scale_tril.T
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        angle = math.degrees(math.atan2(eigenvectors[1, 1].item(), eigenvectors[0, 1].item()))
        color = f"C{index}"
        for radius in (1.0, 2.0):
            width, height = (2 * radius * eigenvalues.sqrt()).flip(0).tolist()
            axes.add_patch(Ellipse(member.loc.tolist(), width, height, angle=angle, fill=False, color=color))
        axes.plot(*member.loc.tolist(), "x", color=color, label=f"q_{index + 1}")
    axes.set(title=f"target (log Z = {LOG_Z:.3f}) and S = {len(members)} fitted Gaussians", aspect="equal")
    axes.legend(loc="upper left")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--S", type=int, default=4, help="number of independently fitted Gaussians")
    parser.add_argument("--L", type=int, nargs="+", default=[1, 100], help="samples per member, one row each")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per member")
    parser.add_argument("--seed", type=int, default=0, help="member s is fitted with seed + s")
    parser.add_argument("--reps", type=int, default=200, help="independent replications per row")
    parser.add_argument("--chunk_size", type=int, default=4096, help="samples drawn and scored at once")
    parser.add_argument("--out", default="own_model.png", help="path of the PNG")
    args = parser.parse_args(argv)
    for name in ("S", "steps", "reps", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if min(args.L) < 1:
        parser.error(f"--L values must be >= 1; got {args.L}")
    return args


def main(argv=None) -> dict[int, dict[str, torch.Tensor]]:
    args = parse_args(argv)
    start = time.perf_counter()
    members = [fit_member(args.seed + s, args.steps) for s in range(args.S)]
    for index, member in enumerate(members):
        print(f"q_{index + 1}: mean ({member.loc[0].item():+.3f}, {member.loc[1].item():+.3f})")
    torch.manual_seed(args.seed)
    results = {L: estimate(members, L, args.reps, args.chunk_size) for L in args.L}
    print(f"\nmean +- standard error over {args.reps} replications (nats); true log Z = {LOG_Z:.4f}")
    print(format_table(results))
    plot(members, args.out)
    print(f"\nwrote {args.out}; {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
