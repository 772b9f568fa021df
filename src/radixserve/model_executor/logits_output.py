"""LogitsOutput: what one model forward hands back (the model runner's
eager path and every CUDA-graph runner alike)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] float32, at each request's last token
    all_logits: Optional[torch.Tensor]  # [num_logit_rows, vocab] when input logprobs asked
    # Speculative decoding: the captured layers' outputs of every token
    # (ForwardBatch.capture_aux_layers), and the hidden state at each
    # request's last token (ForwardBatch.return_hidden).
    aux_hidden: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None

    def split_mixed(self, num_decode: int) -> Tuple["LogitsOutput", "LogitsOutput"]:
        """A mixed batch's logits as (its decode requests', its extend part's):
        the first num_decode rows of both tensors are the decode requests'."""
        extend_all = self.all_logits[num_decode:] if self.all_logits is not None else None
        return (LogitsOutput(self.next_token_logits[:num_decode], None),
                LogitsOutput(self.next_token_logits[num_decode:], extend_all))
