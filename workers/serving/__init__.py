"""Serving finished adapters: one base decoding rows of many adapters together, new rows
joining between steps (`continuous_batch`), adapters loaded and retired while it runs
(`served_model`), and completions cut at stop strings (`text_stream`). No Ray here: the
Ray Serve application around it is `orchestrator.serving`.

May import: workers.spec, workers.base, workers.variants, workers.data, workers.bank, workers.peft_files, workers.after_training
"""
