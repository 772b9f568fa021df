"""Decode throughput with a JSON schema against unconstrained, same model, same run.

    .venv/bin/python bench/constrained_compare.py [--batch 16 --new-tokens 64]

Greedy, EOS ignored for the unconstrained run; the constrained run uses a schema
whose valid outputs are long enough (an array of up to 64 small objects) that
it does not end early. Reports decode tok/s = tokens / (t(new) - t(1)).
"""

from __future__ import annotations

import argparse
import json
import time

from radixserve import Engine

SCHEMA = {"type": "array", "maxItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "ok": {"type": "boolean"}},
    "required": ["id", "ok"], "additionalProperties": False}}


def timed(engine: Engine, prompts: list, params: dict) -> tuple:
    start = time.perf_counter()
    outs = engine.generate(prompts, sampling_params=params)
    return time.perf_counter() - start, sum(o["meta_info"]["completion_tokens"] for o in outs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default="SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with Engine(model_path=args.model_path, log_level="warning") as engine:
        tok = engine.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"List {i + 3} items as JSON."}],
                                           tokenize=False, add_generation_prompt=True) for i in range(args.batch)]
        results = {}
        for name, extra in (("unconstrained", {"ignore_eos": True}),
                            ("json_schema", {"json_schema": json.dumps(SCHEMA), "ignore_eos": True})):
            base = {"temperature": 0, **extra}
            engine.generate(prompts[:1], sampling_params={**base, "max_new_tokens": 2})  # warm-up (compiles)
            t1, _ = timed(engine, prompts, {**base, "max_new_tokens": 1})
            tn, tokens = timed(engine, prompts, {**base, "max_new_tokens": args.new_tokens})
            results[name] = {"decode_tok_s": round((tokens - len(prompts)) / (tn - t1), 1),
                             "tokens": tokens, "t1_s": round(t1, 3), "tn_s": round(tn, 3)}
        results["constrained_over_unconstrained"] = round(
            results["json_schema"]["decode_tok_s"] / results["unconstrained"]["decode_tok_s"], 3)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
