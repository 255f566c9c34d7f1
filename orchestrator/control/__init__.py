"""Control without Ray: the controller's loop (`controller`), the scheduler (a pure
function), admission and memory estimates, the operator config, and the engine behind
one group rank (`engine_worker`); `local_group` runs that loop in one process.

May import: orchestrator.store, orchestrator.spec_check, orchestrator.sweeps, workers.spec, workers.base, workers.variants, workers.data, workers.bank, workers.peft_files, workers.losses, workers.distributed, workers.training
"""
