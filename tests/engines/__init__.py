"""Distributed engines (DDP, FSDP2, DeepSpeed ZeRO, mixed shardings, elastic resume) in real gloo
processes against one process; the worker scripts they launch are in ``workers/``."""
