"""The loss's log-probs of multi-turn samples (issue 17): batching pads prompts on the left and completions on the
right, and a completion holds bridges (tool results, the next assistant opening) that the loss mask leaves out but
the model was shown. Each real token's log-prob in the batch must be the one the model gives the sample alone,
unpadded: the attention covers every real id (`completion_attention_mask`) and no padding."""

from __future__ import annotations

import pytest
import torch

from prefill_kit.grpo.multiturn import Sample, to_rollout
from prefill_kit.grpo.rollout import completion_logps, token_logps

PAD = 0


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


# Prompts and completions of different lengths; each completion: sampled ids (mask 1), a bridge (mask 0), more
# sampled ids; the shortest is a single turn.
SAMPLES = [Sample([5, 6, 7, 8, 9], [10, 11, 12, 30, 31, 32, 33, 13, 14], [1, 1, 1, 0, 0, 0, 0, 1, 1]),
           Sample([5, 6], [20, 21, 34, 35, 22, 23, 24, 25, 26, 27, 28, 29], [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]),
           Sample([5, 6, 7], [15, 16, 17], [1, 1, 1])]


def _alone(model, sample: Sample) -> torch.Tensor:
    """Log-probs of a sample's completion ids, the sample run by itself: no padding, every id attended to."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    p = len(sample.prompt_ids)
    return token_logps(logits[:, p - 1:-1], ids[:, p:], 1.0)[0]


def test_padding_and_bridges_leave_each_real_tokens_logp_as_computed_alone(model):
    batch = to_rollout(SAMPLES, pad_token_id=PAD, truncated=[False] * len(SAMPLES))
    assert batch.prompt_mask[1].tolist() == [0, 0, 0, 1, 1]  # the batch does pad, on both sides
    assert batch.completion_attention_mask[2].tolist() == [1, 1, 1] + [0] * 9
    with torch.no_grad():
        batched = completion_logps(model, batch, temperature=1.0)
    for row, sample in enumerate(SAMPLES):
        alone = _alone(model, sample)
        got = batched[row, :len(sample.completion_ids)]
        sampled = torch.tensor(sample.completion_mask, dtype=torch.bool)
        # the trained tokens, the sampled ones after a bridge included, and the bridge tokens too
        torch.testing.assert_close(got[sampled], alone[sampled], rtol=0, atol=1e-5)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)


def test_hiding_the_bridges_from_the_model_would_change_the_logps(model):
    """The guard can fail: attending only where the loss mask is 1 (the bridge hidden) gives other log-probs for
    the sampled tokens after a bridge."""
    batch = to_rollout(SAMPLES[:1], pad_token_id=PAD, truncated=[False])
    hidden = to_rollout(SAMPLES[:1], pad_token_id=PAD, truncated=[False])
    hidden.completion_attention_mask = hidden.completion_mask.clone()
    with torch.no_grad():
        shown, unseen = completion_logps(model, batch, 1.0), completion_logps(model, hidden, 1.0)
    after_bridge = torch.tensor(SAMPLES[0].completion_mask[7:], dtype=torch.bool)
    assert after_bridge.all()
    assert (shown[0, 7:] - unseen[0, 7:]).abs().max() > 1e-4
