"""The `carpool` command: its parser and queue commands (`main`), the command registry
that other folders plug into, `carpool train` in this process (`local_train`, the
only way the CLI reaches the engine), progress display, plots and sweep commands, and
the process's quick exit once a command is done (`process_exit`).

May import: orchestrator.after_training, orchestrator.control.operator_config, orchestrator.runtime, orchestrator.serving.serve_command, orchestrator.spec_check, orchestrator.store, workers.spec, workers.data, workers.bank.adapter_math, workers.training.engine, workers.training.rounds, workers.training.training_history
"""
