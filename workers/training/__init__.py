"""The engine core: `Engine` (the base, the bank, every job's optimizer, schedule and
data position), the one round loop (`rounds.run_round`), checkpoints and each job's
loss history.

May import: workers.spec, workers.base, workers.variants, workers.data, workers.bank, workers.peft_files, workers.losses, workers.distributed
"""
