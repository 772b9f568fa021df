"""One prefill batch through the scheduler's own batch and ModelRunner, returning
every position's logits per prompt (for comparison with transformers)."""

from __future__ import annotations

from typing import List

import torch


def prefill_all_logits(runner, prompts: List[List[int]]) -> List[torch.Tensor]:
    """Logits [len(prompt), vocab] of each prompt, all prompts in one extend batch."""
    from radixserve.managers.io_struct import TokenizedGenerateReqInput
    from radixserve.managers.req import Req
    from radixserve.managers.schedule_batch import ScheduleBatch
    from radixserve.managers.schedule_policy import PrefillAdder
    from radixserve.sampling.sampling_params import SamplingParams

    reqs = []
    for i, ids in enumerate(prompts):
        sp = SamplingParams.from_dict({"max_new_tokens": 1})
        sp.normalize()
        recv = TokenizedGenerateReqInput(rid=str(i), input_ids=ids, sampling_params=sp,
                                         return_logprob=True, logprob_start_len=0)
        reqs.append(Req(recv, sampling_seed=0))
    budget = sum(len(p) for p in prompts) + 16
    adder = PrefillAdder(runner.max_total_num_tokens, [], 0.7, 1, None, budget)
    assert all(adder.add(r) for r in reqs)
    batch = ScheduleBatch(reqs, runner.pools, runner.device)
    assert batch.prepare_for_extend(adder.plans)
    out = runner.forward(batch.to_forward_batch())
    # Rows per request: positions 0..n-2 (its input logprobs), then its last token.
    logits, start = [], 0
    for ids in prompts:
        logits.append(out.all_logits[start:start + len(ids)])
        start += len(ids)
    return logits
