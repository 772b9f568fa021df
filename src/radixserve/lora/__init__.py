"""Multi-LoRA serving: PEFT adapters on one base model, many in one batch.

spec.py (torch-free): what an adapter is called and where it lives, target
names. adapter.py: a PEFT folder read and checked into host memory.
slots.py: the device slot pool and the per-forward grouping of rows by slot.
delta.py: the batched shrink/expand that the linear layers add to their output.
manager.py: the scheduler process's view (host adapters, slots, admission).
registry.py: the front end's view (names, ids, requests in flight).
"""
