"""Qwen2.5-VL serving against transformers, same shapes, same run.

    python bench/vlm_compare.py [--num-requests 64] [--image-size 448] [--text-len 64]
        [--output-len 128] [--hf-batch 16] [--out results.json]
    python bench/vlm_compare.py --smoke      # tiny shapes, runs on a CPU

The model is Qwen2.5-VL-7B-Instruct's shape (its config.json written here)
with random weights: ours with --load-format dummy, transformers from the
same config with its own random init (weights do not change the work). The
tokenizer is the packaged SmolLM2 one plus Qwen's vision tokens (no download).
Every request: one image of image-size x image-size random pixels (a
different image each, so the radix cache never helps), text-len random text
tokens, output-len new tokens (ignore_eos).
  throughput -- all requests at once: output tokens / wall time.
                Ours: Engine.generate (images preprocessed by the front end,
                encoded in the scheduler). transformers: generate on batches of
                --hf-batch (equal lengths, no padding), its processor outputs precomputed.
  TTFT       -- one request, max_new_tokens 1, best of 3: seconds to the first
                token (ours includes preprocessing; transformers' excludes it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench_shapes import save_default_tokenizer  # noqa: E402
from tests.vlm_models import VISION_TOKENS, make_image, png_data_url  # noqa: E402

SEVEN_B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3)
SMOKE_TEXT = dict(SEVEN_B_TEXT, vocab_size=49160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
SMOKE_VISION = dict(SEVEN_B_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1])


def write_model_dir(out: Path, smoke: bool, tokenizer_dir: Optional[str]) -> Path:
    from transformers import AutoTokenizer, Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    save_default_tokenizer(out, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=SMOKE_TEXT if smoke else SEVEN_B_TEXT, vision_config=SMOKE_VISION if smoke else SEVEN_B_VISION,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, architectures=["Qwen2_5_VLForConditionalGeneration"])
    config.save_pretrained(out)
    Qwen2VLImageProcessorPil().save_pretrained(out)
    return out


def workload(model_dir: Path, args) -> tuple:
    """Per request: prompt ids (text, then <|vision_start|><|image_pad|><|vision_end|>) and one image."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    vision = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS[:3]]  # start, end, pad
    rng = random.Random(0)
    prompts, images = [], []
    for i in range(args.num_requests):
        text = [rng.randrange(100, 40000) for _ in range(args.text_len)]
        prompts.append(text + [vision[0], vision[2], vision[1]])
        images.append(make_image(args.image_size, args.image_size, seed=i))
    return prompts, images


def engine_kwargs(pairs: List[str]) -> dict:
    """key=value pairs; values read as JSON when they parse (numbers, booleans), else strings."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def ours(model_dir: Path, prompts: List[List[int]], images: list, args) -> dict:
    from radixserve import Engine

    engine = Engine(str(model_dir), load_format="dummy", **engine_kwargs(args.engine_arg))
    urls = [png_data_url(im) for im in images]
    sp = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    try:
        engine.generate(input_ids=prompts[:2], image_data=[[u] for u in urls[:2]], sampling_params=sp)  # warm-up
        engine.flush_cache()
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, image_data=[[u] for u in urls], sampling_params=sp)
        wall = time.perf_counter() - start
        ttft = []
        for i in range(3):
            engine.flush_cache()
            t0 = time.perf_counter()
            engine.generate(input_ids=prompts[i], image_data=urls[i], sampling_params=dict(sp, max_new_tokens=1))
            ttft.append(time.perf_counter() - t0)
        prompt_tokens = outs[0]["meta_info"]["prompt_tokens"]
    finally:
        engine.shutdown()
    return {"output_tok_s": sum(o["meta_info"]["completion_tokens"] for o in outs) / wall,
            "ttft_s": min(ttft), "prompt_tokens": prompt_tokens}


@torch.no_grad()
def transformers_side(model_dir: Path, prompts: List[List[int]], images: list, args) -> dict:
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    proc = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    pad = config.image_token_id

    def batch_inputs(idx: List[int]) -> dict:
        pix = proc(images=[images[i] for i in idx], return_tensors="pt")
        per_image = int(pix["image_grid_thw"][0].prod()) // 4
        ids = torch.tensor([p[:-2] + [pad] * per_image + p[-1:] for p in (prompts[i] for i in idx)], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == pad).int(),
                "pixel_values": pix["pixel_values"].to(device, dtype), "image_grid_thw": pix["image_grid_thw"].to(device)}

    def run(inputs: dict, new_tokens: int) -> None:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    batches = [batch_inputs(list(range(i, min(i + args.hf_batch, len(prompts)))))
               for i in range(0, len(prompts), args.hf_batch)]
    run(batches[0], 2)  # warm-up
    start = time.perf_counter()
    for inputs in batches:
        run(inputs, args.output_len)
    wall = time.perf_counter() - start
    one = batch_inputs([0])
    ttft = []
    for _ in range(3):
        t0 = time.perf_counter()
        run(one, 1)
        ttft.append(time.perf_counter() - t0)
    return {"output_tok_s": len(prompts) * args.output_len / wall, "ttft_s": min(ttft)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few requests: runs on a CPU")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--engine-arg", action="append", default=[], help="key=value passed to our Engine")
    p.add_argument("--work-dir", default="/tmp/radixserve-vlm-bench")
    p.add_argument("--tokenizer-dir", help="the embedded model's tokenizer files (default: read from its GGUF)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.num_requests, args.output_len, args.image_size, args.hf_batch = 4, 8, 112, 2
    model_dir = write_model_dir(Path(args.work_dir) / ("smoke" if args.smoke else "qwen2.5-vl-7b"), args.smoke,
                                args.tokenizer_dir)
    prompts, images = workload(model_dir, args)
    result = {"shape": "smoke" if args.smoke else "Qwen2.5-VL-7B", "num_requests": args.num_requests,
              "image_size": args.image_size, "text_len": args.text_len, "output_len": args.output_len,
              "ours": ours(model_dir, prompts, images, args),
              "transformers": transformers_side(model_dir, prompts, images, args)}
    result["throughput_ratio"] = round(result["ours"]["output_tok_s"] / result["transformers"]["output_tok_s"], 3)
    result["ttft_ratio"] = round(result["transformers"]["ttft_s"] / result["ours"]["ttft_s"], 3)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
