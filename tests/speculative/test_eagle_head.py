"""An EAGLE-1/2 head (models/llama_eagle.py, --speculative-algorithm EAGLE)
against the same math in transformers: fc over [embedding of token t+1 ; the
target's final-normed hidden state at t], a LlamaDecoderLayer without its
input norm, then the target's own LM head with no final norm (with a token
map, its rows of the hot tokens only). The target's captured features are
transformers' last hidden state; a bad token map is refused naming the flag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from radixserve.model_executor.model_runner import ModelRunner
from radixserve.server_args import ServerArgs
from radixserve.speculative.eagle import EagleDrafter, load_token_map
from radixserve.speculative.eagle_data import TargetFeatures
from tests.conftest import load_hf_model, write_eagle_head

IDS = [1, 57, 300, 12, 999, 41, 8, 77, 512, 3, 260, 90]


@pytest.fixture(scope="module")
def target(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    return write_eagle_head(target, tmp_path_factory.mktemp("eagle_head"))


@pytest.fixture(scope="module")
def reference(target, head):
    """transformers: (the target's last hidden states [T, H], the head's output
    for the pairs (feature t, token t + 1) at positions t [T - 1, H], its logits)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    hf = load_hf_model(target)
    weights = load_file(str(head / "model.safetensors"))
    layer = LlamaDecoderLayer(LlamaConfig.from_pretrained(head), 0)
    missing, _ = layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in weights.items()
                                        if k.startswith("layers.0.")}, strict=False)
    assert missing == ["input_layernorm.weight"]
    layer.input_layernorm = torch.nn.Identity()
    n = len(IDS) - 1
    with torch.no_grad():
        feats = hf.model(torch.tensor([IDS])).last_hidden_state[0]
        embeds = hf.model.embed_tokens(torch.tensor(IDS[1:]))
        x = torch.nn.functional.linear(torch.cat([embeds, feats[:-1]], dim=-1), weights["fc.weight"],
                                       weights["fc.bias"])[None]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=causal, position_ids=positions,
                    position_embeddings=hf.model.rotary_emb(x, positions))
        out = (out[0] if isinstance(out, tuple) else out)[0]
        return feats, out, hf.lm_head(out)


def drafter_for(target, head, token_map=None):
    """(an EagleDrafter, the target's ModelRunner) on the CPU in float32."""
    args = ServerArgs(model_path=str(target), device="cpu", dtype="float32", max_total_tokens=256,
                      max_running_requests=2, speculative_algorithm="EAGLE",
                      speculative_draft_model_path=str(head), speculative_token_map=token_map)
    runner = ModelRunner(args, warm_up=False)
    return EagleDrafter(args, runner), runner


def run_head(drafter: EagleDrafter, feats: torch.Tensor):
    """The head over every (feature t, token t + 1) pair of IDS: (hidden, logits) per pair."""
    states = drafter.draft.states_for([SimpleNamespace(rid="r", fill_ids=IDS, lora_id=None)])
    n = len(IDS) - 1
    out = drafter.draft.extend(states, [IDS[1:]], [list(range(n))], feats[:-1], logit_rows=[list(range(n))])
    drafter.draft.release("r")
    return out.hidden, out.next_token_logits


def test_head_matches_transformers(target, head, reference):
    ref_feats, ref_hidden, ref_logits = reference
    drafter, runner = drafter_for(target, head)
    assert drafter.aux_layers == (runner.config.num_hidden_layers,)  # the output after the final norm
    captured = TargetFeatures(runner, drafter.aux_layers)(IDS).features
    torch.testing.assert_close(captured, ref_feats, rtol=1e-4, atol=1e-4)
    hidden, logits = run_head(drafter, captured)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert drafter.head.draft_vocab_size == ref_logits.shape[-1]
    argmax = logits.argmax(-1)
    assert torch.equal(drafter.head.to_target_ids(argmax), argmax)


def test_token_map_narrows_the_draft_vocabulary(target, head, reference, tmp_path):
    ref_feats, _, ref_logits = reference
    g = torch.Generator().manual_seed(1)
    hot = torch.cat([torch.randperm(ref_logits.shape[-1], generator=g)[:40], ref_logits.argmax(-1)]).unique()
    hot = hot[torch.randperm(len(hot), generator=g)]  # in no particular order, the head's argmaxes among them
    torch.save(hot, tmp_path / "hot.pt")
    drafter, _ = drafter_for(target, head, str(tmp_path / "hot.pt"))
    _, logits = run_head(drafter, ref_feats)
    assert drafter.head.draft_vocab_size == len(hot)
    torch.testing.assert_close(logits, ref_logits[:, hot], rtol=1e-4, atol=1e-4)
    # a draft id maps back to the target id it stands for
    assert torch.equal(drafter.head.to_target_ids(logits.argmax(-1)), hot[ref_logits[:, hot].argmax(-1)])


@pytest.mark.parametrize("content,problem", [
    (torch.tensor([[1, 2], [3, 4]]), "1-D"),
    (torch.tensor([1.0, 2.0]), "1-D integer"),
    (torch.tensor([], dtype=torch.int64), "non-empty"),
    (torch.tensor([5, 5, 6]), "repeats"),
    (torch.tensor([1, 10**6]), "outside"),
    ("not a tensor file", "cannot be read"),
])
def test_bad_token_maps_are_refused(tmp_path, content, problem):
    path = tmp_path / "map.pt"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=f"speculative_token_map.*{problem}"):
        load_token_map(str(path), vocab_size=1000)


def test_a_list_of_ids_is_a_token_map(tmp_path):
    torch.save([3, 1, 999], tmp_path / "map.pt")
    assert load_token_map(str(tmp_path / "map.pt"), vocab_size=1000).tolist() == [3, 1, 999]
