"""Prefill/decode disaggregation: a prefill server computes prompts and writes
their KV into decode servers' memory (see docs/architecture.md)."""
