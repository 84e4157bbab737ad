"""The log-weight tensors of any model and any ensemble of proposals, drawn in chunks.

This is the generic evaluator behind "MISELBO for your own model": hand it S members that can
sample and score, and the model's log joint; it returns ``log_p [..., S, L]`` and
``log_q [..., S, L, S]`` in the convention of ``miselbo.estimators``, ready for every estimator.

Shape contract (``n`` = number of samples asked for, ``event`` = the shape of one latent z):

* Amortized VI, ``x`` a tensor whose first dimension is the batch, ``B = x.shape[0]``:
  ``member.sample(x, n) -> z [n, B, *event]``, ``member.log_prob(z, x) -> [n, B]``,
  ``log_joint(x, z) -> [n, B]``; the result is ``log_p [B, S, L]``, ``log_q [B, S, L, S]``.
* Classical VI, ``x = None`` (members and the model close over their data themselves):
  ``member.sample(None, n) -> z [n, *event]``, ``member.log_prob(z, None) -> [n]``,
  ``log_joint(None, z) -> [n]``; the result has no batch dimension: ``log_p [S, L]``,
  ``log_q [S, L, S]``. (To keep a batch dimension, pass a tensor x with B = 1 and follow the
  amortized contract.)

All members must sample the same event shape. Results are float64 on the device of the values the
callables return. Work runs under ``torch.no_grad()``; peak memory is that of one chunk of
``chunk_size`` samples (plus the float64 results, S * L * B * (S + 1) numbers).
Cost: S * L samples, S * L log-joint evaluations and S * S * L member densities; with
``sources = A`` (for the some-to-all estimator) |A| * L samples and log-joints, |A| * S * L densities.

``compute_own_log_weights`` gives each member's own log-weights only (log p - log q_s, S * L
densities), for the compute-matched baseline: each member's IWELBO with S * L of its own samples.
"""
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch

__all__ = ["Member", "LogWeights", "compute_log_weights", "compute_own_log_weights"]


class Member(Protocol):
    """One proposal q_s(z | x) of the ensemble (x is None in classical VI)."""

    def sample(self, x: torch.Tensor | None, num_samples: int) -> torch.Tensor:
        """z ~ q_s(. | x): [num_samples, B, *event] (amortized) or [num_samples, *event] (x None)."""

    def log_prob(self, z: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """log q_s(z | x) of z [n, B, *event] -> [n, B] (amortized) or z [n, *event] -> [n]."""


LogJoint = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


class LogWeights(NamedTuple):
    """log_p [..., S, L] = log p(x, z_sl); log_q [..., S, L, S] = log q_j(z_sl | x)."""

    log_p: torch.Tensor
    log_q: torch.Tensor


def _batch_shape(x: torch.Tensor | None) -> tuple[int, ...]:
    if x is None:
        return ()
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be None (classical VI) or a tensor with a batch dimension first; got {x!r:.80}")
    return (x.shape[0],)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def _checked_sample(member: Member, index: int, x, num: int, batch: tuple, event: tuple | None):
    """member.sample(x, num) after checking it returns [num, *batch, *event]."""
    z = member.sample(x, num)
    lead = (num, *batch)
    if not isinstance(z, torch.Tensor) or tuple(z.shape[: len(lead)]) != lead:
        seen = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(
            f"member {index}: sample(x, {num}) returned {seen}; expected shape [num_samples, *batch, *event] "
            f"starting with {lead}"
        )
    if event is not None and tuple(z.shape[len(lead):]) != event:
        raise ValueError(
            f"member {index}: sample returned event shape {tuple(z.shape[len(lead):])}, earlier members "
            f"returned {event}; all members must sample latents of the same shape"
        )
    return z


def _checked_scores(name: str, scores, expected: tuple) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        seen = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{name} returned {seen}; expected shape {expected} = [num_samples, *batch]")
    return scores.to(torch.float64)


def _score_chunk(members, log_joint, x, z, source: int, lead: tuple):
    """(log p(x, z) [n, *batch], log q_j(z | x) for every j [n, *batch, S]) for one chunk of z."""
    log_p = _checked_scores(f"log_joint (on samples of member {source})", log_joint(x, z), lead)
    log_q = [
        _checked_scores(f"member {j}: log_prob (on samples of member {source})", member.log_prob(z, x), lead)
        for j, member in enumerate(members)
    ]
    return log_p, torch.stack(log_q, dim=-1)


def _check_finite_scores(log_p: torch.Tensor, log_q: torch.Tensor) -> None:
    """Name the callable that produced NaN or +inf (the estimators would only name the tensor)."""
    if not (log_p < torch.inf).all():
        raise ValueError("log_joint returned NaN or +inf for some samples")
    bad_columns = (~(log_q < torch.inf)).flatten(0, -2).any(dim=0)  # [S]
    if bad_columns.any():
        raise ValueError(f"member(s) {bad_columns.nonzero().flatten().tolist()}: log_prob returned NaN or +inf")


def _source_indices(sources, num_members: int) -> list[int]:
    if sources is None:
        return list(range(num_members))
    indices = [int(index) for index in sources]
    if not indices or len(set(indices)) != len(indices) or not all(0 <= i < num_members for i in indices):
        raise ValueError(f"sources must be distinct member indices in [0, S = {num_members}); got {list(sources)}")
    return indices


def _rows_for_sources(source_rows: torch.Tensor, sources: list[int], num_members: int) -> torch.Tensor:
    """Place the rows of the sources [|A|, L, ...] at their indices in [S, L, ...]; other rows NaN."""
    if sources == list(range(num_members)):
        return source_rows
    all_rows = source_rows.new_full((num_members, *source_rows.shape[1:]), torch.nan)
    all_rows[sources] = source_rows
    return all_rows


@torch.no_grad()
def compute_log_weights(
    members: Sequence[Member],
    log_joint: LogJoint,
    x: torch.Tensor | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
    sources: Sequence[int] | None = None,
) -> LogWeights:
    """Draw L = num_samples samples from each member, in chunks, and score them under everything.

    log_p[..., s, l] = log_joint(x, z_sl), log_q[..., s, l, j] = members[j].log_prob(z_sl, x),
    z_sl ~ members[s].sample(x, .); ``...`` is [B] for a tensor x and empty for x None (module doc).
    ``chunk_size`` bounds the samples drawn and scored at once (None: all L at once); the result
    does not depend on it beyond the random draws themselves.
    ``sources`` (default: all) limits which members are sampled from, for the some-to-all estimator
    (estimators.some_to_all with members=sources): rows s not in sources are NaN and cost nothing.
    Raises ValueError naming the member whose output breaks the shape contract.
    """
    if len(members) < 1:
        raise ValueError("members must hold at least one member (S >= 1); got none")
    _check_positive_int("num_samples", num_samples)
    chunk_size = num_samples if chunk_size is None else chunk_size
    _check_positive_int("chunk_size", chunk_size)
    source_indices = _source_indices(sources, len(members))
    batch = _batch_shape(x)
    event = None
    log_p_rows, log_q_rows = [], []
    for source in source_indices:
        log_p_chunks, log_q_chunks = [], []
        for start in range(0, num_samples, chunk_size):
            num = min(chunk_size, num_samples - start)
            z = _checked_sample(members[source], source, x, num, batch, event)  # [n, *batch, *event]
            event = tuple(z.shape[1 + len(batch):])
            log_p, log_q = _score_chunk(members, log_joint, x, z, source, (num, *batch))
            log_p_chunks.append(log_p)  # [n, *batch]
            log_q_chunks.append(log_q)  # [n, *batch, S]
        log_p_rows.append(torch.cat(log_p_chunks))  # [L, *batch]
        log_q_rows.append(torch.cat(log_q_chunks))  # [L, *batch, S]
    source_log_p, source_log_q = torch.stack(log_p_rows), torch.stack(log_q_rows)  # [|A|, L, *batch(, S)]
    _check_finite_scores(source_log_p, source_log_q)
    log_p = _rows_for_sources(source_log_p, source_indices, len(members))  # [S, L, *batch]
    log_q = _rows_for_sources(source_log_q, source_indices, len(members))  # [S, L, *batch, S]
    return LogWeights(log_p.movedim((0, 1), (-2, -1)), log_q.movedim((0, 1), (-3, -2)))


@torch.no_grad()
def compute_own_log_weights(
    members: Sequence[Member],
    log_joint: LogJoint,
    x: torch.Tensor | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log_w [..., S, L] = log_joint(x, z_sl) - log q_s(z_sl | x), z_sl ~ members[s]: own densities only.

    With the own diagonal of compute_log_weights' first L samples concatenated in front of
    (S - 1) * L more from here, estimators.iwelbo_from_log_weights gives the compute-matched baseline
    (each member's IWELBO at S * L samples). Same shape contract and chunking as compute_log_weights.
    """
    if len(members) < 1:
        raise ValueError("members must hold at least one member (S >= 1); got none")
    _check_positive_int("num_samples", num_samples)
    chunk_size = num_samples if chunk_size is None else chunk_size
    _check_positive_int("chunk_size", chunk_size)
    batch = _batch_shape(x)
    event, rows = None, []
    for source, member in enumerate(members):
        chunks = []
        for start in range(0, num_samples, chunk_size):
            num = min(chunk_size, num_samples - start)
            z = _checked_sample(member, source, x, num, batch, event)  # [n, *batch, *event]
            event = tuple(z.shape[1 + len(batch):])
            lead = (num, *batch)
            log_p = _checked_scores(f"log_joint (on samples of member {source})", log_joint(x, z), lead)
            log_q = _checked_scores(f"member {source}: log_prob", member.log_prob(z, x), lead)
            if not ((log_p < torch.inf).all() and (log_q < torch.inf).all() and (log_q > -torch.inf).all()):
                raise ValueError(f"member {source}: log_joint or log_prob gave NaN or inf at its own samples")
            chunks.append(log_p - log_q)  # [n, *batch]
        rows.append(torch.cat(chunks))  # [L, *batch]
    return torch.stack(rows).movedim((0, 1), (-2, -1))  # [*batch, S, L]
