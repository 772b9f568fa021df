#!/usr/bin/env bash
# SGLang's bench_serving client and ours on the same workload against one running
# server, alternated (A B A B) so machine noise hits both alike.
#   bench/sglang_bench_compare.sh http://127.0.0.1:30000 [num_prompts input_len output_len concurrency]
# Needs: make setup, make sglang-bench-env. Prints each run's summary lines.
set -euo pipefail
URL=${1:?server URL}
N=${2:-32}; IN=${3:-128}; OUT=${4:-32}; CONC=${5:-4}
PY=${PY:-.venv/bin/python}  # our environment
TOKENIZER=$(curl -s "$URL/model_info" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['tokenizer_path'])")
WORKLOAD=(--dataset-name random-ids --num-prompts "$N" --random-input-len "$IN" --random-output-len "$OUT"
          --random-range-ratio 1 --max-concurrency "$CONC")
# Both clients draw the same prompts every round (fixed seeds): empty the prefix
# cache before each run so no run finds the previous one's prompts.
flush() { curl -s -X POST "$URL/flush_cache" > /dev/null; }
for round in 1 2; do
  echo "== round $round: sglang.bench_serving"
  flush
  .venv-sglang/bin/python bench/sglang_bench_serving.py --backend sglang --base-url "$URL" \
      --tokenizer "$TOKENIZER" --output-file "${TMPDIR:-/tmp}/sglang_bench_serving.jsonl" "${WORKLOAD[@]}" 2>&1 \
    | grep -E "Successful requests|Benchmark duration|Total input tokens|Total generated tokens|Request throughput|Output token throughput|Mean TTFT|Mean ITL"
  echo "== round $round: radixserve.bench_serving"
  flush
  "$PY" -m radixserve.bench_serving --backend sglang --base-url "$URL" \
      --tokenizer "$TOKENIZER" "${WORKLOAD[@]}" 2>&1 \
    | grep -E "Successful requests|Benchmark duration|Total input tokens|Total generated tokens|Request throughput|Output token throughput|Mean TTFT|Mean ITL"
done
