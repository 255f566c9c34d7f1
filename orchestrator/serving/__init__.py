"""`carpool serve`: trained adapters behind an OpenAI-compatible HTTP endpoint, as a Ray
Serve application on the carpool's cluster. The catalog of bases, adapter versions and
aliases (`adapter_catalog`, `adapter_sources`), OpenAI's request and response shapes
(`openai_protocol`), the ingress and the per-base decoding deployment (`ingress`,
`base_server`), deploying and stopping it (`deployment`, `serve_command`), and the
controller's news of a succeeded job (`serving_news`).

May import: orchestrator.cli.cli_registry, orchestrator.after_training.adapter_args, orchestrator.control.operator_config, orchestrator.runtime.client, orchestrator.runtime.actor_names, orchestrator.store, workers.spec, workers.base.base_fingerprint, workers.serving, workers.after_training.fused_inference
"""
