"""`carpool eval`, `generate` and `merge`: they load finished adapters into a bank in
the CLI's own process, by design (no cluster needed). They plug into the CLI through
its command registry.

May import: orchestrator.cli.cli_registry, workers.spec, workers.base, workers.data, workers.bank, workers.peft_files, workers.after_training
"""
