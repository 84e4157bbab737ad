"""Files that must survive crashes and adversaries: NVAE checkpoints (safe load, strict load, atomic
save, field validation), atomic and verified writes, run locks, result sets, folders removed when a
run fails before writing."""
