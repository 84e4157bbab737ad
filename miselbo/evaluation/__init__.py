"""What miselbo_eval.py runs: its settings, the members and examples it loads, one process's shard,
finiteness checks and the report (table, results.json, ablation CSV and plot, samples figure)."""
