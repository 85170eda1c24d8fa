"""Training: the run (``vlkit train``), the loop, checkpoints, optimiser and recipes."""
