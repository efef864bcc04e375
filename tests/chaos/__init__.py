"""Fault campaign on the real dev cluster and PostgreSQL: ``python -m tests.chaos --help``.

Clients submit with one ``Idempotency-Key`` per logical job and retry while the broker is
SIGKILLed and restarted and sshd, slurmctld and slurmdbd are stopped and started; afterwards the
campaign checks, against sacct, that no job was lost or duplicated and that the ledger charged
exactly what Slurm accounted. ``campaign.py`` holds it; ``test_chaos.py`` runs a short one.
"""
