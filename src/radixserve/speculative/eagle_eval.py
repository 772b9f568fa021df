"""What a draft head would get at serving time, measured offline: its drafts
on held-out sequences the target answered greedily, walked as a chain
speculation of `num_steps` drafts walks them: from the end of each prompt,
each verify starting where the last accepted token ends, until the answer is
complete (the verify steps are serving's; the last one's accepted drafts may
run past the answer, where serving would cut them)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence

import torch

from radixserve.speculative.eagle_data import Sample, windows


@dataclass
class DraftEvaluation:
    accept_length: float  # tokens per verify step of the walk (drafts accepted + the target's own)
    step_agreement: List[float]  # per draft step: top-1 agreement with the target over all answer positions
    verify_steps: int
    vocab_coverage: float  # of the target's choices in the answers, the share the draft vocabulary holds


@torch.no_grad()
def evaluate_head(head: torch.nn.Module, samples: Sequence[Sample], prompt_lens: Sequence[int],
                  draft_to_target: torch.Tensor, num_steps: int, device: str) -> DraftEvaluation:
    """samples: greedy target answers (tokens == the target's choices);
    draft_to_target: the target id of each draft-vocabulary id."""
    draft_to_target = draft_to_target.cpu()  # the walk runs on the host; the head on `device`
    verify_steps = tokens = 0
    agree = torch.zeros(num_steps)
    counted = torch.zeros(num_steps)
    covered = choices = 0
    for sample, prompt_len in zip(samples, prompt_lens):
        length = len(sample.tokens)
        if length - prompt_len < 2:
            continue
        (features, inputs, labels, _), = windows([sample], length, num_steps, random.Random(0))
        logits = head.train_forward(features[None].float().to(device), inputs[:, None].to(device))
        drafts = torch.stack([draft_to_target[step[0].argmax(-1).cpu()] for step in logits])  # [S, T-1]
        hits = (drafts == labels) & (labels >= 0)
        answer = slice(prompt_len - 1, None)
        agree += hits[:, answer].sum(1)
        counted += (labels[:, answer] >= 0).sum(1)
        first = labels[0, answer][labels[0, answer] >= 0]
        covered += int(torch.isin(first, draft_to_target).sum())
        choices += len(first)
        origin = prompt_len - 1
        while origin < length - 2:  # as serving: no verify once the answer is complete
            accepted = int(hits[:, origin].int().cumprod(0).sum())
            verify_steps, tokens = verify_steps + 1, tokens + accepted + 1
            origin += accepted + 1
    return DraftEvaluation(tokens / max(verify_steps, 1), (agree / counted.clamp(min=1)).tolist(), verify_steps,
                           covered / max(choices, 1))
