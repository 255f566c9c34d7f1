"""Hyperparameter sweeps: the sweep file and each trial's job spec, the Optuna study
(ask-and-tell) and its pruners, and the driver the controller runs on its loop.

May import: orchestrator.spec_check, orchestrator.store, workers.spec
"""
