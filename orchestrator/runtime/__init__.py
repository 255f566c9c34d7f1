"""The edge to Ray: the controller actor and the worker-group actors, Ray metrics,
starting and stopping a local head, the auth token, and the Python `Client`. The only
folder of the control plane that imports ray.

May import: orchestrator.control, orchestrator.store, orchestrator.spec_check, orchestrator.sweeps, orchestrator.serving.serving_news, workers.spec, workers.training
"""
