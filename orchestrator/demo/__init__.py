"""`make demo`: a tiny base pretrained on first run, three demo jobs through the real
queue (`carpool up`, submit, watch, fetch, generate, down).

May import: orchestrator.cli, orchestrator.runtime, workers.base, workers.data
"""
