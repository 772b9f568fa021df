"""bench/cpu_decode_compare.py's table of issue 20's ratios, from a results line."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from cpu_decode_compare import targets_table  # noqa: E402


def test_ratios_against_the_right_peer():
    """Batch 1 against transformers' float32 even when bfloat16 is faster; larger
    batches against the faster dtype; HTTP against the offline batch-32 output."""
    results = {
        "radixserve_bs1": {"decode_tok_s": 75.0}, "transformers_float32_bs1": {"decode_tok_s": 30.0},
        "transformers_bfloat16_bs1": {"decode_tok_s": 50.0},
        "radixserve_bs32": {"decode_tok_s": 1500.0, "output_tok_s": 900.0},
        "transformers_float32_bs32": {"decode_tok_s": 300.0}, "transformers_bfloat16_bs32": {"decode_tok_s": 500.0},
        "radixserve_http_c32": {"output_throughput": 765.0},
    }
    rows = targets_table(results).splitlines()[2:]
    assert rows == [
        "| batch 1, decode tok/s | 75.0 | 30.0 (float32) | 2.50x |",
        "| batch 32, decode tok/s | 1,500.0 | 500.0 (bfloat16) | 3.00x |",
        "| HTTP, 32 streaming clients, output tok/s | 765.0 | offline batch 32: 900.0 | 0.850 |",
    ]
