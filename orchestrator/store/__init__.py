"""What the control plane keeps: the durable job queue (SQLite; its records and schema
migrations), job ids, the artifact store, and which state directory a command uses.
Standard library only.

May import: nothing else of carpool
"""
