"""Training across ranks: adapter-gradient all-reduce (data parallel) and the base
partitioned by DeepSpeed ZeRO-3. The only place deepspeed is imported.

May import: workers.data, workers.variants
"""
