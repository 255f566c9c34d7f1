"""The frozen base: loading it (full precision or 4-bit), its linear modules, its
fingerprint (which base an adapter was trained on), the facts validation keeps of it
between runs, gradient checkpointing, and the tiny local bases that tests, benchmarks
and the demo build.

May import: workers.spec
"""
