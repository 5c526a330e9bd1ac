"""Grid fan-out and job entry points (submitit, SLURM or local)."""
