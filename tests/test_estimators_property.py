"""Property-based tests: random shapes and log-weights, huge, tiny and -inf ones included.

For any valid input: no estimator returns NaN, and the orderings that hold for every realization hold
(up to float64 rounding, relative to the size of the inputs):
  pooled >= miselbo                        (Jensen over members)
  average_iwelbo >= average_elbo           (Jensen over samples)
  miselbo >= average_elbo + jsd            (Jensen over samples; equality when L = 1)
  miselbo <= average_iwelbo + log S        (q_mix >= q_s / S)
  jsd <= log S                             (same reason)
  S2A over all members == S2S over all members == miselbo
"""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from miselbo import estimators as est

FINITE = st.one_of(
    st.floats(-30.0, 30.0),
    st.floats(-1e4, 1e4),
    st.sampled_from([-1e4, 1e4, -1e-300, 1e-300, 0.0, -5e3]),
)


@st.composite
def log_weight_tensors(draw):
    """(log_p [..., S, L], log_q [..., S, L, S]) with -inf in log_p and off the diagonal of log_q."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    S, L = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    log_p = draw(arrays(np.float64, (*lead, S, L), elements=FINITE))
    log_q = draw(arrays(np.float64, (*lead, S, L, S), elements=FINITE))
    p_holes = draw(arrays(np.bool_, log_p.shape, elements=st.booleans()))
    q_holes = draw(arrays(np.bool_, log_q.shape, elements=st.booleans()))
    q_holes &= ~np.eye(S, dtype=bool)[:, None, :]  # never the own density log_q[..., s, l, s]
    log_p[p_holes & draw(st.booleans())] = -np.inf
    log_q[q_holes] = -np.inf
    return torch.from_numpy(log_p), torch.from_numpy(log_q)


def tolerance(log_p, log_q):
    """Rounding allowance: relative to the largest finite magnitude in the inputs."""
    finite = torch.cat([log_p[log_p.isfinite()], log_q[log_q.isfinite()]])
    return 1e-10 * (1.0 + finite.abs().max().item())


def assert_at_least(larger, smaller, tol, what):
    violation = smaller - tol > larger  # -inf on both sides compares as no violation
    assert not violation.any(), f"{what}: {larger[violation]} < {smaller[violation]}"


@settings(max_examples=300, deadline=None)
@given(log_weight_tensors())
def test_valid_input_never_gives_nan_and_orderings_hold(tensors):
    log_p, log_q = tensors
    S = log_q.shape[-1]
    tol = tolerance(log_p, log_q)
    values = {
        "miselbo": est.miselbo(log_p, log_q),
        "pooled": est.pooled_mis_bound(log_p, log_q),
        "average_iwelbo": est.average_iwelbo(log_p, log_q),
        "average_elbo": est.average_elbo(log_p, log_q),
        "jsd": est.jsd(log_q),
        "log_mix": est.log_mixture_density(log_q),
    }
    for name, value in values.items():
        assert not value.isnan().any(), name
        assert not (value == math.inf).any(), name
    assert values["jsd"].isfinite().all() and values["log_mix"].isfinite().all()
    assert_at_least(values["pooled"], values["miselbo"], tol, "pooled >= miselbo")
    assert_at_least(values["average_iwelbo"], values["average_elbo"], tol, "average_iwelbo >= average_elbo")
    assert_at_least(values["miselbo"], values["average_elbo"] + values["jsd"], tol, "miselbo >= elbo + jsd")
    assert_at_least(values["average_iwelbo"] + math.log(S), values["miselbo"], tol, "miselbo <= iwelbo + log S")
    assert_at_least(torch.full_like(values["jsd"], math.log(S)), values["jsd"], tol, "jsd <= log S")
    everyone = list(range(S))
    for subset_estimator in (est.some_to_all, est.some_to_some):
        torch.testing.assert_close(subset_estimator(log_p, log_q, everyone), values["miselbo"], rtol=0, atol=tol)


@settings(max_examples=100, deadline=None)
@given(log_weight_tensors())
def test_l1_identity_holds_for_any_valid_input(tensors):
    log_p, log_q = tensors
    log_p, log_q = log_p[..., :1], log_q[..., :1, :]  # L = 1
    lhs = est.miselbo(log_p, log_q)
    rhs = est.average_elbo(log_p, log_q) + est.jsd(log_q)
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=tolerance(log_p, log_q))
