"""Shared pieces of the benchmark tools (`radixserve.bench_serving`,
`radixserve.bench_offline_throughput`, `radixserve.bench_one_batch`): workload
datasets, per-request metrics, and table / JSON-line reporting."""
