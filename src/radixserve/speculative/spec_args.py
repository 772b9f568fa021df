"""The speculative-decoding flags: checked, defaults filled in, and what
speculation cannot run with yet turned off (with a warning) or refused.

Torch-free: ServerArgs calls it before any process starts."""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)

ALGORITHMS = ("EAGLE", "EAGLE3", "NGRAM", "STANDALONE")
NGRAM_MATCH_TYPES = ("BFS", "PROB")
DEFAULT_NUM_STEPS = 3
MAX_TREE_ROWS = 64  # as speculative/tree.py (kept torch-free here)
HEAD_ALGORITHMS = ("EAGLE", "EAGLE3")  # a draft head over the target's hidden states
# a draft model of its own (a head or STANDALONE): its own KV pool; top-K trees
DRAFT_MODEL_ALGORITHMS = HEAD_ALGORITHMS + ("STANDALONE",)


def validate_speculative(args: Any) -> None:
    """args: a ServerArgs. Raises ValueError naming the flag; may switch off
    features that cannot run with speculation yet."""
    algo = args.speculative_algorithm
    if algo is None:
        return
    if algo not in ALGORITHMS:
        raise ValueError(f"speculative_algorithm must be one of {'|'.join(ALGORITHMS)}, got {algo!r}")
    _check_ngram(args)
    _fill_sizes(args)
    if algo == "EAGLE3" and not args.speculative_draft_model_path:
        args.speculative_draft_model_path = shipped_head(args.model_path)
    if algo in DRAFT_MODEL_ALGORITHMS and not args.speculative_draft_model_path:
        raise ValueError(f"speculative_algorithm={algo} needs speculative_draft_model_path (STANDALONE: a "
                         "smaller model with the same tokenizer; EAGLE3: a head folder, as `python -m "
                         "radixserve.train_eagle3` writes (a head ships only for the default model); EAGLE: an "
                         "EAGLE-1/2 head folder)")
    _check_token_map(args)
    _refuse_combinations(args)
    _turn_off_for_speculation(args)


def _check_token_map(args: Any) -> None:
    """A token map narrows an EAGLE-1/2 head's vocabulary (its contents are
    checked when the head loads: speculative/eagle.py load_token_map)."""
    path = args.speculative_token_map
    if path is None:
        return
    if args.speculative_algorithm != "EAGLE":
        raise ValueError(f"speculative_token_map is read with speculative_algorithm=EAGLE only (EAGLE-3 heads "
                         f"carry their reduced vocabulary, d2t, in the head folder), got "
                         f"{args.speculative_algorithm}")
    from pathlib import Path

    if not Path(path).is_file():
        raise ValueError(f"speculative_token_map {path!r} is not a file")


def _check_ngram(args: Any) -> None:
    """The NGRAM flags (checked whatever the algorithm: they are SGLang's and always parsed)."""
    if args.speculative_ngram_match_type not in NGRAM_MATCH_TYPES:
        raise ValueError(f"speculative_ngram_match_type must be BFS|PROB, "
                         f"got {args.speculative_ngram_match_type!r}")
    for name in ("speculative_ngram_min_bfs_breadth", "speculative_ngram_max_bfs_breadth",
                 "speculative_ngram_max_trie_depth", "speculative_ngram_capacity", "speculative_max_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    if args.speculative_ngram_min_bfs_breadth > args.speculative_ngram_max_bfs_breadth:
        raise ValueError(f"speculative_ngram_min_bfs_breadth ({args.speculative_ngram_min_bfs_breadth}) must be "
                         f"<= speculative_ngram_max_bfs_breadth ({args.speculative_ngram_max_bfs_breadth})")


def shipped_head(model_path: str) -> Optional[str]:
    """The EAGLE-3 head shipped for a packaged model, in speculative/heads/<name>/
    (the default model's; None for any other model)."""
    from pathlib import Path

    folder = Path(__file__).parent / "heads" / str(model_path)
    return str(folder) if (folder / "config.json").is_file() else None


def _fill_sizes(args: Any) -> None:
    if args.speculative_num_steps is None:
        args.speculative_num_steps = DEFAULT_NUM_STEPS
    if args.speculative_eagle_topk is None:
        args.speculative_eagle_topk = 1
    if args.speculative_num_steps < 1:
        raise ValueError(f"speculative_num_steps must be >= 1, got {args.speculative_num_steps}")
    if args.speculative_eagle_topk < 1:
        raise ValueError(f"speculative_eagle_topk must be >= 1, got {args.speculative_eagle_topk}")
    if args.speculative_eagle_topk != 1 and args.speculative_algorithm not in DRAFT_MODEL_ALGORITHMS:  # NGRAM
        raise ValueError(f"speculative_eagle_topk must be 1 with NGRAM (its trees' breadth is "
                         f"speculative_ngram_min_bfs_breadth..speculative_ngram_max_bfs_breadth), "
                         f"got {args.speculative_eagle_topk}")
    if args.speculative_num_draft_tokens is None:
        args.speculative_num_draft_tokens = (args.speculative_num_steps + 1 if not eagle_trees(args)
                                             else min(1 + args.speculative_eagle_topk * args.speculative_num_steps,
                                                      MAX_TREE_ROWS))
    if ngram_trees(args) or eagle_trees(args):
        # A tree verifies the last token and up to num_draft_tokens - 1 drafts
        # on at most num_steps levels; each row's mask is one int64.
        if not 2 <= args.speculative_num_draft_tokens <= MAX_TREE_ROWS:
            raise ValueError(f"speculative_num_draft_tokens must be in [2, {MAX_TREE_ROWS}] for draft trees, "
                             f"got {args.speculative_num_draft_tokens}")
    elif args.speculative_num_draft_tokens != args.speculative_num_steps + 1:
        # A chain verifies the last token and one draft per step.
        raise ValueError(f"speculative_num_draft_tokens must be speculative_num_steps + 1 "
                         f"({args.speculative_num_steps + 1}) for a chain (speculative_eagle_topk=1, "
                         f"NGRAM with speculative_ngram_max_bfs_breadth=1), "
                         f"got {args.speculative_num_draft_tokens}")
    if eagle_trees(args):
        _check_eagle_tree(args)


def _check_eagle_tree(args: Any) -> None:
    """Top-K trees: the root's K children must fit the budget; the budget must
    be reachable (K at the first level, K * K candidates at each later one);
    a draft step's rows (the frontier and its ancestors: K per level below
    the last) each carry one int64 mask."""
    topk, steps, nodes = args.speculative_eagle_topk, args.speculative_num_steps, args.speculative_num_draft_tokens - 1
    if topk > nodes:
        raise ValueError(f"speculative_eagle_topk ({topk}) must be <= speculative_num_draft_tokens - 1 ({nodes})")
    reachable = topk + (steps - 1) * topk * topk
    if nodes > reachable:
        raise ValueError(f"speculative_num_draft_tokens - 1 ({nodes}) exceeds the {reachable} candidates "
                         f"speculative_num_steps={steps} steps of speculative_eagle_topk={topk} make")
    if topk * (steps - 1) > MAX_TREE_ROWS:
        raise ValueError(f"speculative_num_steps ({steps}) - 1 times speculative_eagle_topk ({topk}) must be "
                         f"<= {MAX_TREE_ROWS} (the draft rows of one tree step)")


def eagle_trees(args: Any) -> bool:
    """A draft model (an EAGLE or EAGLE-3 head, or STANDALONE) drafts top-K trees."""
    return args.speculative_algorithm in DRAFT_MODEL_ALGORITHMS and (args.speculative_eagle_topk or 1) > 1


def draft_trees(args: Any) -> bool:
    """Verify steps may carry trees (NGRAM with breadth > 1, a draft model with top-K > 1)."""
    return ngram_trees(args) or eagle_trees(args)


def ngram_trees(args: Any) -> bool:
    """NGRAM drafts trees (more than one branch per node allowed)."""
    return args.speculative_algorithm == "NGRAM" and args.speculative_ngram_max_bfs_breadth > 1


def _refuse_combinations(args: Any) -> None:
    refused = {
        "tp_size > 1": args.tp_size > 1,
        "enable_lora": args.enable_lora,
        # a verify forward runs the extend kernels, a plain step the decode ones
        "enable_deterministic_inference": args.enable_deterministic_inference,
        "is_embedding": args.is_embedding,  # an embedding server never decodes
        # the decode side's first step follows a transferred prefill the drafter never saw
        "disaggregation_mode": args.disaggregation_mode != "null",
    }
    for what, present in refused.items():
        if present:
            raise ValueError(f"speculative_algorithm cannot be combined with {what} yet")


def _turn_off_for_speculation(args: Any) -> None:
    """A verify step runs alone (not inside a mixed batch). (The overlap
    schedule stays: plain steps overlap, and the scheduler processes the step
    in flight before a verify step is built.)"""
    if args.enable_mixed_chunk:
        logger.warning("speculative decoding: --enable-mixed-chunk is turned off")
        args.enable_mixed_chunk = False
