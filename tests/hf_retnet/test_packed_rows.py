"""Packed rows: several documents in one row, told apart by position_ids restarting at 0 (TRL padding_free,
DataCollatorWithFlattening, --pack). Each document must be computed exactly as if it stood alone: the retention
state and the decay restart at its first token in every mode, and so do the rotary positions."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from hf_retnet import RetNetConfig, RetNetForCausalLM
from hf_retnet.modeling_retnet import (
    CACHE_FIELD,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
    retnet_log_decays,
)

TOL = 1e-4  # fp32, as the mode-equivalence tests (test_retention_modes.py)
MODES = ("parallel", "chunkwise", "recurrent")

# Document lengths per row: with chunk sizes 2..8 the starts fall inside chunks and exactly on chunk edges
# (4 + 4 starts the second document at a multiple of 2, 4 and 8; 3 + 5 at an odd offset; one-token documents).
LAYOUTS = {
    "edges": [4, 4, 8],
    "inside": [3, 5, 1, 6],
    "single_tokens": [1, 1, 5, 1],
}


def tiny_config(**kw):
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=64, chunk_size=4)
    return RetNetConfig(**{**base, **kw})


def packed_position_ids(lengths):
    return torch.cat([torch.arange(n) for n in lengths])


def run_ops(mode, q, k, v, log_decay, time, state, segments, chunk_size):
    if mode == "parallel":
        return retention_parallel(q, k, v, log_decay, time, state, segments)
    if mode == "chunkwise":
        return retention_chunkwise(q, k, v, log_decay, time, state, chunk_size, segments)
    return retention_recurrent(q, k, v, log_decay, time, state, segments)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("start_at_zero", [False, True])
def test_ops_restart_at_document_starts(mode, chunk_size, layout, start_at_zero):
    """Each document alone (the first one continuing the incoming state unless it starts a new document) equals
    its slice of the packed row; the final state is the last document's."""
    lengths = LAYOUTS[layout]
    b, h, t, dk, dv = 2, 4, sum(lengths), 8, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, h, t, dk, generator=g), torch.randn(b, h, t, dk, generator=g) / 3, torch.randn(b, h, t, dv, generator=g)
    log_decay = retnet_log_decays(h) * 20  # fast decays would hide a leak across documents less than slow ones do
    log_decay[-1] = retnet_log_decays(h)[-1]
    state = torch.randn(b, h, dk, dv, generator=g)
    time = torch.arange(1, t + 1, dtype=torch.float).expand(b, t)
    starts = torch.zeros(t, dtype=torch.long)
    starts[torch.tensor(lengths).cumsum(0)[:-1]] = 1
    starts[0] = int(start_at_zero)
    segments = starts.cumsum(0).expand(b, t)
    out, final = run_ops(mode, q, k, v, log_decay, time, state, segments, chunk_size)

    offset, expected, doc_state = 0, [], None
    for i, n in enumerate(lengths):
        sl = slice(offset, offset + n)
        incoming = state if i == 0 and not start_at_zero else None
        doc_time = torch.arange(1, n + 1, dtype=torch.float).expand(b, n)
        doc_out, doc_state = retention_recurrent(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_decay, doc_time, incoming)
        expected.append(doc_out)
        offset += n
    torch.testing.assert_close(out, torch.cat(expected, dim=2), atol=TOL, rtol=TOL)
    torch.testing.assert_close(final, doc_state, atol=TOL, rtol=TOL)


OPTIONS = {
    "default": {},
    "gqa": dict(num_kv_heads=2),
    "score_normalization": dict(retention_score_normalization=True),
    "gqa_score_normalization_interleaved": dict(
        num_kv_heads=1, retention_score_normalization=True, rotary_style="interleaved", rotary_spacing="linspace"
    ),
}


def alone(model, docs, mode):
    """Logits and final state of each document run on its own."""
    outs = [model(d[None], retention_mode=mode, use_cache=True) for d in docs]
    return [o.logits[0] for o in outs], outs[-1][CACHE_FIELD].states


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_packed_row_equals_documents_alone(mode, chunk_size, layout, option):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=chunk_size, initializer_range=0.2, **OPTIONS[option])).eval()
    lengths = LAYOUTS[layout]
    docs = [torch.randint(3, 97, (n,)) for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], position_ids=packed_position_ids(lengths)[None], retention_mode=mode,
                       use_cache=True)
        expected, last_state = alone(model, docs, mode)
    torch.testing.assert_close(packed.logits[0], torch.cat(expected), atol=TOL, rtol=TOL)
    for got, want in zip(packed[CACHE_FIELD].states, last_state):
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("option", ["default", "gqa_score_normalization_interleaved"])
def test_packed_rows_with_padding_mask(mode, padding, option):
    """A batch of packed rows padded to one width (position ids 0 on padding, as collators write them)."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=3, initializer_range=0.2, **OPTIONS[option])).eval()
    rows = [[4, 3, 2], [5, 1]]
    width = max(sum(r) for r in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    docs = []
    for i, lengths in enumerate(rows):
        row_docs = [torch.randint(3, 97, (n,)) for n in lengths]
        docs.append(row_docs)
        n = sum(lengths)
        sl = slice(width - n, width) if padding == "left" else slice(0, n)
        ids[i, sl], pos[i, sl], mask[i, sl] = torch.cat(row_docs), packed_position_ids(lengths), 1
    with torch.no_grad():
        packed = model(ids, attention_mask=mask, position_ids=pos, retention_mode=mode, use_cache=True)
        for i, row_docs in enumerate(docs):
            expected, last_state = alone(model, row_docs, mode)
            torch.testing.assert_close(packed.logits[i][mask[i].bool()], torch.cat(expected), atol=TOL, rtol=TOL)
            for got, want in zip(packed[CACHE_FIELD].states, last_state):
                torch.testing.assert_close(got[i : i + 1], want, atol=TOL, rtol=TOL)


def test_decoding_after_a_packed_prompt_continues_its_last_document():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(initializer_range=0.2)).eval()
    docs = [torch.randint(3, 97, (n,)) for n in (5, 6)]
    tail = torch.randint(3, 97, (3,))
    with torch.no_grad():
        out = model(torch.cat(docs)[None], position_ids=packed_position_ids([5, 6])[None], use_cache=True)
        cache, steps = out[CACHE_FIELD], []
        for token in tail:
            out = model(token.view(1, 1), cache=cache, use_cache=True)
            cache = out[CACHE_FIELD]
            steps.append(out.logits[0, -1])
        expected = model(torch.cat([docs[1], tail])[None]).logits[0, -3:]
    torch.testing.assert_close(torch.stack(steps), expected, atol=TOL, rtol=TOL)


def test_no_restart_takes_the_unpacked_path():
    """position_ids counting up from 0 (one document per row) and generate()'s left-padded ids (0 on padding, then
    0, 1, 2, ...) give exactly what no position_ids gives."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with_pos = model(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(plain, with_pos)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
def test_packed_loss_equals_per_document_losses(mode):
    """labels = input_ids on a packed row: the loss is the token-weighted mean of each document's own loss (a
    document's first token is never predicted from the document before it), and DataCollatorWithFlattening's
    batch (-100 at each first token) gives the same."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(initializer_range=0.2)).eval()
    lengths = [5, 7, 4]
    docs = [torch.randint(3, 97, (n,)) for n in lengths]
    with torch.no_grad():
        per_doc = [model(d[None], labels=d[None], retention_mode=mode).loss for d in docs]
        expected = sum(loss * (n - 1) for loss, n in zip(per_doc, lengths)) / sum(n - 1 for n in lengths)
        ids = torch.cat(docs)[None]
        packed = model(ids, labels=ids, position_ids=packed_position_ids(lengths)[None], retention_mode=mode).loss
        batch = DataCollatorWithFlattening()([{"input_ids": d.tolist(), "labels": d.tolist()} for d in docs])
        collated = model(**batch, retention_mode=mode).loss
    torch.testing.assert_close(packed, expected, atol=TOL, rtol=TOL)
    torch.testing.assert_close(collated, expected, atol=TOL, rtol=TOL)


def test_packed_gradients_parallel_vs_chunkwise():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(chunk_size=4, num_kv_heads=2))
    lengths = [3, 6, 4]
    ids = torch.randint(3, 97, (1, sum(lengths)))
    pos = packed_position_ids(lengths)[None]
    grads = {}
    for mode in ("parallel", "chunkwise"):
        model.zero_grad()
        model(ids, labels=ids, position_ids=pos, retention_mode=mode).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["parallel"].items():
        torch.testing.assert_close(grads["chunkwise"][name], g, atol=TOL, rtol=1e-3, msg=name)
