"""Pure math on log-weight tensors, for any model: MISELBO, IWELBO, pooled MIS, average ELBO and
IWELBO, JSD, S2A / S2S (`bounds`), and the generic evaluator that draws those tensors from callables
(`generic`). Imports only torch.

    from miselbo import estimators as est
    est.miselbo(log_p, log_q)          # log_p [..., S, L], log_q [..., S, L, S] -> [...]
"""
from miselbo.estimators.bounds import *  # noqa: F401,F403 (the public API, listed in bounds.__all__)
from miselbo.estimators.bounds import __all__ as _bounds_all
from miselbo.estimators.generic import LogWeights, Member, compute_log_weights, compute_own_log_weights

__all__ = [*_bounds_all, "LogWeights", "Member", "compute_log_weights", "compute_own_log_weights"]
