"""After training: finished adapters of any kind evaluated and decoded together in
one bank, with no graph (`fused_inference`), and merged with PEFT (`adapter_merge`).

May import: workers.spec, workers.base, workers.variants, workers.data, workers.bank, workers.peft_files, workers.losses
"""
