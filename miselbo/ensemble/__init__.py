"""One decoder and S encoders -> the log-weight tensors log_p [B, S, L] and log_q [B, S, L, S]:
the fast path (`log_weights.Ensemble`), members sharing one decoder in memory (`shared_decoder`),
and the slow S*S*L reference it is tested against (`naive`)."""
