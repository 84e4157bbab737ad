"""Estimators of log p(x) from the log-weights of an ensemble of S proposals (all in nats).

Convention shared by every function here:

* ``log_p`` has shape ``[..., S, L]``: ``log_p[..., s, l] = log p(x, z_sl)``, where ``z_sl`` is the
  l-th sample drawn from member ``q_s(z | x)``.
* ``log_q`` has shape ``[..., S, L, S]``: ``log_q[..., s, l, j] = log q_j(z_sl | x)``, every
  member's log-density at every drawn sample. ``log_q[..., s, l, s]`` is the member's own density.
* Leading dimensions (a batch of x, replications, ...) are free and are kept in the outputs.
* Inputs are converted to float64 and every result is float64, on the inputs' device.

Legal values: ``-inf`` in ``log_p`` (zero joint density, the sample gets zero weight) and ``-inf`` in
``log_q`` off the own-density diagonal (member j cannot produce z_sl). Illegal, raising ValueError:
NaN or ``+inf`` anywhere, ``-inf`` as a member's own density of its own sample, empty S or L, shapes
that disagree.

References: Burda, Grosse & Salakhutdinov (2016), "Importance weighted autoencoders" (IWELBO);
Kviman, Melin, Koptagel, Elvira & Lagergren (2022), "Multiple importance sampling ELBO and deep
ensembles of variational approximations" (MISELBO); Hotti, Kviman, Molén, Elvira & Lagergren (2024),
"Efficient mixture learning in black-box variational inference" (S2A / S2S).
"""
import math
from collections.abc import Sequence

import torch

__all__ = [
    "validate_log_weights",
    "log_mixture_density",
    "miselbo",
    "pooled_mis_bound",
    "iwelbo",
    "average_iwelbo",
    "average_elbo",
    "jsd",
    "draw_members",
    "some_to_all",
    "some_to_some",
    "iwelbo_from_log_weights",
    "reduced",
]

Members = Sequence[int] | torch.Tensor | int


# ----------------------------------------------------------------------------- validation

def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def _check_no_nan_or_posinf(name: str, values: torch.Tensor) -> None:
    """One reduction: NaN < inf and +inf < inf are both False, -inf < inf is True."""
    bad = ~(values < math.inf)
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must not contain NaN or +inf; found {int(bad.sum())} such entries of "
            f"{values.numel()} (shape {tuple(values.shape)}), the first at index {first} "
            f"with value {values[first].item()}"
        )


def _check_shapes(log_p: torch.Tensor, log_q: torch.Tensor, square: bool) -> None:
    if log_p.dim() < 2:
        raise ValueError(f"log_p must have shape [..., S, L] (rank >= 2); got shape {tuple(log_p.shape)}")
    if log_q.dim() != log_p.dim() + 1 or log_q.shape[:-1] != log_p.shape:
        raise ValueError(
            f"log_q must have shape log_p.shape + (S,) = [..., S, L, S]; got log_p shape "
            f"{tuple(log_p.shape)} and log_q shape {tuple(log_q.shape)}"
        )
    num_rows, num_samples, num_columns = log_q.shape[-3:]
    if num_rows < 1 or num_samples < 1:
        raise ValueError(
            f"need S >= 1 members and L >= 1 samples; got S = {num_rows}, L = {num_samples} "
            f"(log_p shape {tuple(log_p.shape)})"
        )
    if square and num_columns != num_rows:
        raise ValueError(
            f"log_q must have shape [..., S, L, S] with the same S in dims -3 and -1; got shape "
            f"{tuple(log_q.shape)} (S = {num_rows} rows of samples, {num_columns} density columns)"
        )


def _own_log_density(log_q: torch.Tensor) -> torch.Tensor:
    """log q_s(z_sl): the diagonal of the first K columns of log_q [..., K, L, M] -> [..., K, L]."""
    num_rows = log_q.shape[-3]
    return torch.diagonal(log_q[..., :num_rows], dim1=-3, dim2=-1).transpose(-1, -2)  # [..., K, L]


def _check_own_density_finite(log_q: torch.Tensor) -> None:
    own = _own_log_density(log_q)  # [..., K, L]
    bad = own == -math.inf
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"log_q[..., s, l, s] (a member's own density of its own sample) must be > -inf; found "
            f"{int(bad.sum())} -inf entries, the first at (..., s, l) = {first} "
            f"(log_q shape {tuple(log_q.shape)})"
        )


def _validated(log_p, log_q, square: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of (log_p [..., K, L], log_q [..., K, L, M]) after every check.

    Row k's own density is column k; ``square=False`` allows extra columns (M >= K), used by S2A.
    """
    log_p = _require_tensor("log_p", log_p).to(torch.float64)
    log_q = _require_tensor("log_q", log_q).to(torch.float64)
    _check_shapes(log_p, log_q, square)
    _check_no_nan_or_posinf("log_p", log_p)
    _check_no_nan_or_posinf("log_q", log_q)
    _check_own_density_finite(log_q)
    return log_p, log_q


def validate_log_weights(log_p, log_q) -> tuple[torch.Tensor, torch.Tensor]:
    """Check (log_p [..., S, L], log_q [..., S, L, S]) against the convention; return float64 copies.

    Raises ValueError naming the argument and the shapes or values seen. Every estimator calls it.
    """
    return _validated(log_p, log_q)


def _validated_log_q(log_q) -> torch.Tensor:
    log_q = _require_tensor("log_q", log_q).to(torch.float64)
    if log_q.dim() < 3:
        raise ValueError(f"log_q must have shape [..., S, L, S] (rank >= 3); got shape {tuple(log_q.shape)}")
    dummy_log_p = log_q.new_zeros(log_q.shape[:-1])  # [..., S, L], only for the shape checks
    _check_shapes(dummy_log_p, log_q, square=True)
    _check_no_nan_or_posinf("log_q", log_q)
    _check_own_density_finite(log_q)
    return log_q


# ----------------------------------------------------------------------------- kernels (validated input)

def _log_mix(log_q: torch.Tensor) -> torch.Tensor:
    """log q_mix = logsumexp_j log_q[..., j] - log M: [..., K, L, M] -> [..., K, L]."""
    return torch.logsumexp(log_q, dim=-1) - math.log(log_q.shape[-1])


def _per_member_mis(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """logsumexp_l (log_p - log_q_mix) - log L: [..., K, L], [..., K, L, M] -> [..., K]."""
    return _per_member_mis_of_mixture(log_p, _log_mix(log_q))


def _per_member_mis_of_mixture(log_p: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
    """logsumexp_l (log_p - log_q_mix) - log L: [..., K, L], [..., K, L] -> [..., K]."""
    log_w_mix = log_p - log_q_mix  # [..., K, L]
    return torch.logsumexp(log_w_mix, dim=-1) - math.log(log_p.shape[-1])


def _pooled_of_mixture(log_p: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
    """logsumexp_{s, l} (log_p - log_q_mix) - log(S L): [..., S, L] twice -> [...]."""
    log_w_mix = log_p - log_q_mix  # [..., S, L]
    num_weights = log_w_mix.shape[-1] * log_w_mix.shape[-2]
    return torch.logsumexp(log_w_mix, dim=(-2, -1)) - math.log(num_weights)


def _iwelbo_of_log_weights(log_w: torch.Tensor) -> torch.Tensor:
    """logsumexp_l log_w - log L: [..., S, L] -> [..., S]."""
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def _log_w_own(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log_p - log q_s(z_sl): [..., S, L]."""
    return log_p - _own_log_density(log_q)


# ----------------------------------------------------------------------------- public estimators

def log_mixture_density(log_q) -> torch.Tensor:
    """Log-density of the uniform mixture at every sample, shape [..., S, L] (nats).

    log_q_mix[..., s, l] = logsumexp_j log_q[..., s, l, j] - log S  =  log (1/S) sum_j q_j(z_sl | x).
    Special case: S = 1 gives the member's own density log_q[..., 0, :, 0].
    """
    return _log_mix(_validated_log_q(log_q))


def miselbo(log_p, log_q) -> torch.Tensor:
    """The L-sample MISELBO of Kviman et al. (2022), shape [...] (nats).

    miselbo = (1/S) sum_s [ logsumexp_l (log_p[s, l] - log_q_mix[s, l]) - log L ],
    log_q_mix = log_mixture_density(log_q). A lower bound on log p(x) in expectation.
    Special cases: S = 1 is the IWELBO (Burda et al. 2016); L = 1 is the basic MISELBO
    E_{s ~ U, z ~ q_s}[log p(x, z) - log q_mix(z)] = average_elbo + jsd.
    Limit L -> inf when the members' supports do not overlap: log p(x) - KL(uniform || w), where w_s
    is the share of the posterior mass that q_s covers (below log p(x) unless the shares are equal;
    see pooled_mis_bound).
    """
    log_p, log_q = _validated(log_p, log_q)
    return _per_member_mis(log_p, log_q).mean(dim=-1)


def pooled_mis_bound(log_p, log_q) -> torch.Tensor:
    """The pooled (stratified, deterministic-mixture) MIS bound, shape [...] (nats).

    pooled = logsumexp_{s, l} (log_p[s, l] - log_q_mix[s, l]) - log(S L).
    Its exponent is an unbiased estimate of p(x) with the mixture as proposal, stratified over
    members, so it lower-bounds log p(x) in expectation and tends to log p(x) as L grows whatever
    share of the posterior each member covers. By Jensen, pooled >= miselbo on the same samples,
    with equality when S = 1 (both are then the IWELBO).
    """
    log_p, log_q = _validated(log_p, log_q)
    return _pooled_of_mixture(log_p, _log_mix(log_q))


def iwelbo(log_p, log_q) -> torch.Tensor:
    """Each member's own IWELBO (Burda et al. 2016), shape [..., S] (nats).

    iwelbo[..., s] = logsumexp_l (log_p[s, l] - log_q[s, l, s]) - log L.
    Only the own-density diagonal of log_q is read. L = 1 is the member's single-sample ELBO.
    """
    log_p, log_q = _validated(log_p, log_q)
    return _iwelbo_of_log_weights(_log_w_own(log_p, log_q))


def average_iwelbo(log_p, log_q) -> torch.Tensor:
    """The members' IWELBOs averaged, shape [...] (nats).

    average_iwelbo = (1/S) sum_s [ logsumexp_l (log_p[s, l] - log_q[s, l, s]) - log L ].
    On the same samples: average_iwelbo >= average_elbo (Jensen) and average_iwelbo >= miselbo - log S
    (q_mix >= q_s / S). It can exceed miselbo + log S (tests/test_claims.py has an example).
    """
    return iwelbo(log_p, log_q).mean(dim=-1)


def average_elbo(log_p, log_q) -> torch.Tensor:
    """The members' ELBO estimates averaged over members and samples, shape [...] (nats).

    average_elbo = (1/(S L)) sum_{s, l} (log_p[s, l] - log_q[s, l, s]).
    With L = 1: miselbo = average_elbo + jsd exactly.
    """
    log_p, log_q = _validated(log_p, log_q)
    return _log_w_own(log_p, log_q).mean(dim=(-2, -1))


def jsd(log_q) -> torch.Tensor:
    """Estimate of the ensemble's generalized Jensen-Shannon divergence, shape [...] (nats).

    jsd = (1/S) sum_s (1/L) sum_l [ log_q[s, l, s] - log_q_mix[s, l] ],
    an unbiased estimate of (1/S) sum_s KL(q_s || q_mix), which lies in [0, log S].
    Every term is <= log S, so the estimate is <= log S; it can be slightly negative for small L.
    S = 1 gives 0. This is the gain of the basic MISELBO over the average ELBO (Kviman et al. 2022).
    """
    log_q = _validated_log_q(log_q)
    return (_own_log_density(log_q) - _log_mix(log_q)).mean(dim=(-2, -1))


# ----------------------------------------------------------------------------- S2A / S2S (Hotti et al. 2024)

def draw_members(num_members: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` distinct member indices in [0, num_members), uniform without replacement, sorted.

    Uses torch.randperm with ``generator`` (the global generator when None). Draw the subset with this
    function *before* sampling, so that samples are needed only from the drawn members.
    """
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= num_members:
        raise ValueError(f"members: a count must be an int in [1, S = {num_members}]; got {count!r}")
    drawn = torch.randperm(num_members, generator=generator)[:count]
    return drawn.sort().values


def _member_indices(members: Members, num_members: int, generator) -> torch.Tensor:
    if isinstance(members, int) and not isinstance(members, bool):
        return draw_members(num_members, members, generator)
    indices = torch.as_tensor(members).flatten()
    if indices.numel() == 0 or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(
            f"members must be a non-empty sequence of int member indices or an int count; got {members!r}"
        )
    indices = indices.long()
    out_of_range = (indices < 0) | (indices >= num_members)
    if out_of_range.any() or indices.unique().numel() != indices.numel():
        raise ValueError(
            f"members must be distinct indices in [0, S = {num_members}); got {indices.tolist()}"
        )
    return indices.sort().values


def _subset_tensors(log_p, log_q, members, generator, keep_all_columns: bool):
    """Rows (and, unless keep_all_columns, columns) of the subset A, reordered so A comes first.

    Returns validated float64 (log_p_A [..., K, L], log_q_A [..., K, L, M]) with M = S or K; row k's
    own density is column k. Rows of members outside A are sliced away before any check or read.
    """
    _check_shapes(_require_tensor("log_p", log_p), _require_tensor("log_q", log_q), square=True)
    num_members = log_q.shape[-1]
    subset = _member_indices(members, num_members, generator).to(log_q.device)  # [K]
    log_p_rows = log_p.index_select(-2, subset)  # [..., K, L]
    log_q_rows = log_q.index_select(-3, subset)  # [..., K, L, S]
    if keep_all_columns:
        in_subset = torch.zeros(num_members, dtype=torch.bool, device=log_q.device)
        in_subset[subset] = True
        rest = torch.arange(num_members, device=log_q.device)[~in_subset]
        columns = torch.cat([subset, rest])  # [S], subset first
    else:
        columns = subset  # [K]
    return _validated(log_p_rows, log_q_rows.index_select(-1, columns), square=False)


def some_to_all(log_p, log_q, members: Members, generator: torch.Generator | None = None) -> torch.Tensor:
    """The some-to-all (S2A) estimator of Hotti et al. (2024), shape [...] (nats).

    s2a = (1/|A|) sum_{s in A} [ logsumexp_l (log_p[s, l] - log_q_mix[s, l]) - log L ],
    log_q_mix[s, l] = logsumexp_{j=1..S} log_q[s, l, j] - log S (the mixture of ALL members).
    With A uniform over subsets of a fixed size it is unbiased for miselbo on the same tensors;
    A = all members gives miselbo exactly.

    ``members``: distinct member indices (A), or an int count |A| drawn uniformly without
    replacement with ``generator`` (see draw_members; draw first, then sample only from A).
    Cost: samples, hence decoder passes, are needed only from members in A, but every member's
    density at those samples. Rows s not in A of log_p / log_q are never read nor validated: keep
    the full [..., S, L] / [..., S, L, S] shapes and fill those rows with anything (e.g. NaN).
    """
    log_p_subset, log_q_subset = _subset_tensors(log_p, log_q, members, generator, keep_all_columns=True)
    return _per_member_mis(log_p_subset, log_q_subset).mean(dim=-1)


def some_to_some(log_p, log_q, members: Members, generator: torch.Generator | None = None) -> torch.Tensor:
    """The some-to-some (S2S) estimator of Hotti et al. (2024), shape [...] (nats).

    s2s = (1/|A|) sum_{s in A} [ logsumexp_l (log_p[s, l] - log_q_mix_A[s, l]) - log L ],
    log_q_mix_A[s, l] = logsumexp_{j in A} log_q[s, l, j] - log |A| (the mixture of the subset only).
    It is the MISELBO of the sub-ensemble A: a lower bound on log p(x) in expectation, cheaper than
    S2A. At L = 1 it is looser than miselbo in expectation over the draws and A (the entropy is
    concave), not for every draw nor for every A (a subset of the best members can lie above it);
    at larger L it can be tighter (tests/test_claims.py). A = all members gives miselbo; |A| = 1
    gives that member's IWELBO.

    ``members``: as in some_to_all. Cost: samples and densities are needed only from members in A;
    rows s not in A and columns j not in A of log_q are never read nor validated (fill with anything).
    """
    log_p_subset, log_q_subset = _subset_tensors(log_p, log_q, members, generator, keep_all_columns=False)
    return _per_member_mis(log_p_subset, log_q_subset).mean(dim=-1)


def iwelbo_from_log_weights(log_w) -> torch.Tensor:
    """Each member's IWELBO from its own log-weights log_w [..., S, M] = log p - log q_s: [..., S].

    iwelbo[..., s] = logsumexp_m log_w[..., s, m] - log M. With M = S L (the L samples MISELBO used
    plus (S - 1) L more) it is the compute-matched baseline: as many samples as MISELBO spends.
    """
    log_w = _require_tensor("log_w", log_w).to(torch.float64)
    if log_w.dim() < 2 or log_w.shape[-1] < 1 or log_w.shape[-2] < 1:
        raise ValueError(f"log_w must have shape [..., S, M] with S, M >= 1; got {tuple(log_w.shape)}")
    _check_no_nan_or_posinf("log_w", log_w)
    return _iwelbo_of_log_weights(log_w)


# ----------------------------------------------------------------------------- reduced inputs

class reduced:  # noqa: N801 (a namespace of functions)
    """The same estimators from per-sample reductions, for evaluators that never hold log_q.

    Inputs are [..., S, L] float64 tensors: log_p, log_q_own = log q_s(z_sl) and
    log_q_mix = log (1/S) sum_j q_j(z_sl) (or the mixture of a subset). On the same numbers they
    equal the full-tensor functions (the full ones call these kernels). No validation here: the
    caller (e.g. miselbo.ensemble.log_weights.Ensemble.reduced_weights) produces the tensors.
    """

    @staticmethod
    def per_member_mis(log_p: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
        """[..., S]: logsumexp_l (log_p - log_q_mix) - log L (MISELBO's term of each member)."""
        return _per_member_mis_of_mixture(log_p, log_q_mix)

    @staticmethod
    def miselbo(log_p: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
        """[...]: (1/S) sum_s [ logsumexp_l (log_p - log_q_mix) - log L ]."""
        return _per_member_mis_of_mixture(log_p, log_q_mix).mean(dim=-1)

    @staticmethod
    def pooled(log_p: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
        """[...]: logsumexp_{s, l} (log_p - log_q_mix) - log(S L)."""
        return _pooled_of_mixture(log_p, log_q_mix)

    @staticmethod
    def iwelbo(log_w: torch.Tensor) -> torch.Tensor:
        """[..., S]: logsumexp_l log_w - log L, log_w = log_p - log_q_own (any number of samples)."""
        return _iwelbo_of_log_weights(log_w)

    @staticmethod
    def average_elbo(log_p: torch.Tensor, log_q_own: torch.Tensor) -> torch.Tensor:
        """[...]: (1/(S L)) sum_{s, l} (log_p - log_q_own)."""
        return (log_p - log_q_own).mean(dim=(-2, -1))

    @staticmethod
    def jsd(log_q_own: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
        """[...]: (1/(S L)) sum_{s, l} (log_q_own - log_q_mix)."""
        return (log_q_own - log_q_mix).mean(dim=(-2, -1))

    @staticmethod
    def subset_mean(per_member: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[...]: (1/|A|) sum_{s in A} per_member[..., s] for a bool mask active [..., S] (S2A / S2S
        from per_member_mis with the full or the subset mixture; rows outside A may hold NaN)."""
        picked = torch.where(active, per_member, torch.zeros_like(per_member))
        return picked.sum(dim=-1) / active.sum(dim=-1)
