"""Adapter kinds: a job's weights of every kind (`job_adapter`), their fresh start
(`new_adapters`), and each kind's own math (DoRA, VeRA, AdaLoRA). Nothing here knows
about batches, the bank or training.

May import: workers.spec, workers.base
"""
