"""Prefill + recurrent decoding, generate() with a RetNetCache, left-padded batches, pipeline and streamers."""

import pytest
import torch
from transformers import TextIteratorStreamer, pipeline

from hf_retnet import RetNetCache, RetNetConfig, RetNetForCausalLM
from hf_retnet.modeling_retnet import CACHE_FIELD

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = RetNetConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return RetNetForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sharp_model():
    """Larger init: next-token distributions depend strongly on the context, so a lost state cannot hide."""
    torch.manual_seed(0)
    config = RetNetConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4,
        initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return RetNetForCausalLM(config).eval()


def uncached_logprobs(model, seq):
    """log p(next | seq[:t+1]) at every position, each from a full forward with no state carried over."""
    return torch.log_softmax(model(seq, use_cache=False).logits.double(), -1)


def exhaustive_beam_search(model, prompt, num_beams, steps):
    """Textbook beam search (no EOS, no length penalty) re-running every hypothesis from scratch at each step."""
    beams = [(0.0, prompt)]
    for _ in range(steps):
        candidates = []
        for score, seq in beams:
            logp = uncached_logprobs(model, seq[None])[0, -1]
            top = logp.topk(num_beams)
            candidates += [(score + v.item(), torch.cat([seq, i.view(1)])) for v, i in zip(top.values, top.indices)]
        beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
    return beams


@pytest.mark.parametrize("prompt_len", [3, 8, 11])
@pytest.mark.parametrize("prefill_mode", ["chunkwise", "parallel"])
def test_prefill_then_recurrent_decoding_equals_full_forward(model, prompt_len, prefill_mode):
    ids = torch.randint(3, 97, (2, prompt_len + 6))
    full = model(ids, retention_mode="parallel").logits
    out = model(ids[:, :prompt_len], retention_mode=prefill_mode, use_cache=True)
    cache = out[CACHE_FIELD]
    assert isinstance(cache, RetNetCache)
    steps = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, retention_mode="recurrent", use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=TOL)


def test_chunked_prefill_in_pieces_equals_one_forward(model):
    ids = torch.randint(3, 97, (1, 21))
    full = model(ids, retention_mode="chunkwise").logits
    cache, pieces = None, []
    for start in range(0, 21, 8):
        out = model(ids[:, start : start + 8], cache=cache, use_cache=True)
        cache = out[CACHE_FIELD]
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=TOL, rtol=TOL)


def test_greedy_generate_equals_argmax_loop_without_cache(sharp_model):
    ids = torch.randint(3, 97, (2, 7))
    out = sharp_model.generate(
        ids, max_new_tokens=10, do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_logits=True
    )
    seq = ids
    for _ in range(10):
        nxt = sharp_model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out.sequences, seq)
    # every step's logits come from the carried state and equal a full uncached forward over the prefix
    full = sharp_model(seq, use_cache=False).logits[:, 6:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=TOL, rtol=TOL)


def test_left_padded_batch_generates_what_each_sequence_generates_alone(model):
    prompts = [torch.randint(3, 97, (n,)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, width:], alone[0, len(p) :]), f"sequence {i} differs"


def test_sampling_equals_a_manual_sampling_loop_without_cache(sharp_model):
    ids = torch.randint(3, 97, (2, 5))
    torch.manual_seed(1)
    sampled = sharp_model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10, eos_token_id=None)
    torch.manual_seed(1)
    seq = ids
    for _ in range(6):
        logits = sharp_model(seq, use_cache=False).logits[:, -1]
        kth = logits.topk(10).values[:, -1:]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], dim=1)
    assert torch.equal(sampled, seq)


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_equals_exhaustive_uncached_search_and_rescoring(sharp_model, num_beams):
    ids = torch.randint(3, 97, (2, 5))
    steps = 6
    out = sharp_model.generate(
        ids, max_new_tokens=steps, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
        eos_token_id=None, length_penalty=0.0, early_stopping=True, return_dict_in_generate=True, output_scores=True,
    )
    for b in range(ids.shape[0]):
        expected = exhaustive_beam_search(sharp_model, ids[b], num_beams, steps)
        got = out.sequences[b * num_beams : (b + 1) * num_beams]
        for (score, seq), hyp, hyp_score in zip(expected, got, out.sequences_scores[b * num_beams :]):
            assert torch.equal(hyp, seq)
            torch.testing.assert_close(hyp_score.double(), torch.tensor(score, dtype=torch.float64), atol=1e-4, rtol=0)
    # sequences_scores equal rescoring the returned sequences from scratch
    logp = uncached_logprobs(sharp_model, out.sequences)[:, 4:-1].gather(-1, out.sequences[:, 5:, None]).sum((1, 2))
    torch.testing.assert_close(out.sequences_scores.double(), logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("how", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_generation_is_refused_clearly(model, how):
    """Our refusal, whichever release: 5.2 checked `_is_stateful` itself, 5.25 fails later with "Assisted decoding
    requires a cache" (a RuntimeError) unless the model refuses first."""
    ids = torch.randint(3, 97, (1, 5))
    kwargs = {"assistant_model": model} if how == "assistant_model" else {"prompt_lookup_num_tokens": 2}
    with pytest.raises(ValueError, match="stateful model whose recurrent state cannot be rolled back"):
        model.generate(ids, max_new_tokens=3, **kwargs)


def test_padding_step_while_decoding_changes_nothing(sharp_model):
    """A one-token step with attention_mask 0 neither adds to nor decays the state, nor moves the position."""
    ids = torch.randint(3, 97, (2, 9))
    full = sharp_model(ids, retention_mode="parallel").logits
    mask = torch.ones(2, 6, dtype=torch.long)
    cache = sharp_model(ids[:, :6], attention_mask=mask, use_cache=True)[CACHE_FIELD]

    def step(tokens, real):
        nonlocal mask, cache
        mask = torch.cat([mask, torch.tensor(real).view(2, 1)], dim=1)
        out = sharp_model(torch.tensor(tokens).view(2, 1), attention_mask=mask, cache=cache, use_cache=True)
        cache = out[CACHE_FIELD]
        return out.logits[:, 0]

    torch.testing.assert_close(step([ids[0, 6], ids[1, 6]], [1, 1]), full[:, 6], atol=TOL, rtol=TOL)
    torch.testing.assert_close(step([ids[0, 7], 0], [1, 0])[0], full[0, 7], atol=TOL, rtol=TOL)  # row 1: padding
    last = step([ids[0, 8], ids[1, 7]], [1, 1])
    torch.testing.assert_close(last, torch.stack([full[0, 8], full[1, 7]]), atol=TOL, rtol=TOL)
    assert cache.seen_tokens.tolist() == [9, 8]


@pytest.mark.parametrize("seq_len", [1, 4])
def test_out_of_vocabulary_ids_fail_clearly(model, seq_len):
    """Also for one-token steps, where the explicit check (a device sync per token) is skipped."""
    cache = model(torch.randint(3, 97, (1, 4)), use_cache=True)[CACHE_FIELD]
    ids = torch.full((1, seq_len), 5)
    ids[0, -1] = 97
    with pytest.raises(ValueError, match="input id 97 is outside the vocabulary"):
        model(ids, cache=cache, use_cache=True)


def test_pipeline_and_streamer(tiny_tokenizer):
    torch.manual_seed(0)
    config = RetNetConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64,
        pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = RetNetForCausalLM(config).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    text = generator("the cat reads", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the cat reads") and len(text) > len("the cat reads")

    streamer = TextIteratorStreamer(tiny_tokenizer, skip_prompt=True)
    ids = tiny_tokenizer("the cat reads", return_tensors="pt")
    import threading

    thread = threading.Thread(target=model.generate, kwargs=dict(**ids, max_new_tokens=5, do_sample=False, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    direct = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert streamed == tiny_tokenizer.decode(direct[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
