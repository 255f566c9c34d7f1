"""`python -m carpool ...` runs the `carpool` command."""

from carpool.orchestrator.cli.main import run

run()
