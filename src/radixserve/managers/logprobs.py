"""Turning logits into the logprob records a request asked for."""

from __future__ import annotations

from typing import List

import torch

from radixserve.managers.schedule_batch import ExtendPlan


def record_input_logprobs(plans: List[ExtendPlan], all_logits: torch.Tensor) -> None:
    """all_logits rows follow ExtendPlan order: each plan's input-logprob
    positions, then its last token. Appends to each request's input logprobs."""
    rows, targets, owners = [], [], []
    row = 0
    for plan in plans:
        for pos in plan.input_logprob_positions:
            rows.append(row)
            targets.append(plan.req.origin_input_ids[pos + 1])
            owners.append(plan)
            row += 1
        row += 1  # the last token's row feeds the sampler
    for plan in plans:
        req = plan.req
        if req.return_logprob and not req.input_logprobs_done and req.kv_len - plan.extend_len == 0:
            if req.logprob_start_len == 0:
                req.input_token_logprobs.append((None, req.origin_input_ids[0]))
                req.input_top_logprobs.append(None)
    if rows:
        device = all_logits.device
        logprobs = torch.log_softmax(all_logits[torch.tensor(rows, device=device)].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0].tolist()
        k = max(plan.req.top_logprobs_num for plan in plans)
        top_vals = top_ids = None
        if k > 0:
            top = logprobs.topk(k, dim=-1)
            top_vals, top_ids = top.values.tolist(), top.indices.tolist()
        for i, (plan, target) in enumerate(zip(owners, targets)):
            req = plan.req
            req.input_token_logprobs.append((chosen[i], target))
            if req.top_logprobs_num > 0:
                n = req.top_logprobs_num
                req.input_top_logprobs.append(list(zip(top_vals[i][:n], top_ids[i][:n])))
    for plan in plans:
        if plan.completes_prefill:
            plan.req.input_logprobs_done = True


def record_output_logprob(req, row: int, token: int, logprobs, top_vals, top_ids) -> None:
    """logprobs / top_vals / top_ids: host lists for the whole batch."""
    req.output_token_logprobs.append((logprobs[row], token))
    if req.top_logprobs_num > 0:
        n = req.top_logprobs_num
        req.output_top_logprobs.append(list(zip(top_vals[row][:n], top_ids[row][:n])))
