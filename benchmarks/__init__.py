"""Benchmarks of the broker against the Slurm dev cluster: what it adds to sbatch, what it costs
the controller as the queue grows, and how fast it serves reads. ``python -m benchmarks`` runs
them all and writes ``docs/performance.md``; see ``benchmarks/README.md``."""
