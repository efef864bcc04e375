"""The ``broker`` command: run the service, migrate the database, bootstrap admins, and (through
the REST API) everything a researcher or admin does day to day.

Exit codes: 0 success, 1 unexpected error, 2 usage error, 3 not found, 4 refused by policy or
quota, 5 invalid input, 6 authentication or permission, 7 broker or cluster unavailable.
"""

from __future__ import annotations

import typer

from broker.cli import client, ledger, server

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
server.register(app)
ledger.register(app)
client.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
