"""The cache's encodings, bit packing, shard files and sequence keys, on synthetic top-k answers."""

import numpy as np
import pytest

from training.teachers.cache.format import (
    CompactEncoding,
    decode_scale,
    encode_scale,
    fill_free_ids,
    pack_unary,
    pack_varwidth,
    unary_decode,
    NaiveEncoding,
    make_encoding,
    open_shard,
    pack_bits,
    read_shard_header,
    sequence_key,
    shard_bytes,
    unpack_bits,
)
from training.utils.io import atomic_write_bytes


def topk_answer(n: int, vocab: int, k: int, sharpness: float, seed: int = 0):
    """[n, k] ids and fp32 log-probs of peaked random distributions (sorted descending), like a trained LM's."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, vocab)) * sharpness  # [n, V]
    logits[np.arange(n), rng.integers(0, vocab, n)] += 2 * sharpness  # a clear favourite per row
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    return ids.astype(np.int64), np.take_along_axis(logprobs, ids, 1).astype(np.float32)


@pytest.mark.parametrize("width", [1, 7, 9, 17, 25, 33, 57])
def test_pack_bits_round_trip(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 1 << width, size=1001, dtype=np.uint64)
    stream = pack_bits(values, width)
    assert stream.nbytes == -(-1001 * width // 8) + 8
    np.testing.assert_array_equal(unpack_bits(stream, width, 0, 1001), values)
    np.testing.assert_array_equal(unpack_bits(stream, width, 333, 101), values[333:434])
    assert unpack_bits(stream, width, 5, 0).shape == (0,)


def test_sequence_key_depends_on_every_id_and_not_on_dtype():
    ids = [5, 17, 3, 0, 300000]
    assert sequence_key(ids) == sequence_key(np.array(ids, dtype=np.int64))
    assert len(sequence_key(ids)) == 16
    assert sequence_key(ids) != sequence_key(ids[:-1])
    assert sequence_key(ids) != sequence_key([5, 17, 3, 1, 300000])


@pytest.mark.parametrize("k", [1, 8, 64])
def test_naive_round_trip_is_exact_up_to_fp16(k):
    ids, logprobs = topk_answer(50, 300, k, sharpness=2.0)
    enc = NaiveEncoding(k, 300)
    arrays, entries = enc.pack([enc.encode(ids[:20], logprobs[:20]), enc.encode(ids[20:], logprobs[20:])])
    assert arrays["token_ids"].nbytes + arrays["logprobs"].nbytes == 50 * k * 6
    out_ids, out_lp = enc.decode(arrays, [(0, 20), (20, 50)], [(0, 20 * k), (20 * k, 50 * k)], k)
    np.testing.assert_array_equal(out_ids, ids)
    np.testing.assert_allclose(out_lp, logprobs, rtol=1e-3, atol=1e-3)
    assert out_ids.dtype == np.int64 and out_lp.dtype == np.float32


def lp_of(ids_row, lp_row):
    """{id: log-prob} of the kept slots of one decoded row."""
    return {int(i): float(v) for i, v in zip(ids_row, lp_row) if np.isfinite(v)}


@pytest.mark.parametrize("k,vocab,mass,bits", [(64, 5000, 0.999, 8), (128, 128256, 0.99, 5), (32, 100, 1.0, 8),
                                               (16, 300, 0.9, 3)])
def test_compact_keeps_mass_tail_and_order(k, vocab, mass, bits):
    n = 200
    ids, logprobs = topk_answer(n, vocab, k, sharpness=3.0, seed=k)
    enc = CompactEncoding(k, vocab, mass=mass, logprob_bits=bits)
    arrays, entries = enc.pack([enc.encode(ids[:77], logprobs[:77]), enc.encode(ids[77:], logprobs[77:])])
    units = np.concatenate([[0], np.cumsum(entries)])
    out_ids, out_lp = enc.decode(arrays, [(0, 77), (77, n)], [(units[0], units[1]), (units[1], units[2])], k)
    counts = arrays["counts"].astype(int)
    p = np.exp(logprobs.astype(np.float64))
    step = decode_scale(arrays["scale_code"]).astype(np.float64)
    for i in range(n):
        m = counts[i]
        # the kept entries are the shortest prefix holding `mass` of the top-k's probability
        assert p[i, :m].sum() >= mass * p[i].sum() - 1e-6
        assert m == 1 or p[i, : m - 1].sum() < mass * p[i].sum()
        assert sorted(out_ids[i, :m]) == sorted(ids[i, :m])  # the same ids, each with its own log-prob:
        truth = dict(zip(ids[i, :m].tolist(), logprobs[i, :m].tolist()))
        for token, value in lp_of(out_ids[i], out_lp[i]).items():
            assert abs(value - truth[token]) <= step[i] + 0.01  # half a step + a renormalization shift <= half a step
        assert len(set(out_ids[i].tolist())) == k  # k distinct ids: missing slots name ids that were not kept
    kept = np.arange(k)[None, :] < counts[:, None]
    assert np.isfinite(out_lp[kept]).all() and np.isneginf(out_lp[~kept]).all()
    assert (np.diff(np.where(kept, out_lp, -1e30), axis=1) <= 0).all()  # sorted by descending log-prob
    # decoded mass + stored tail == 1, and the tail is the exact mass outside the kept entries (fp16 log)
    decoded_mass = np.exp(out_lp.astype(np.float64)).sum(1)
    true_tail = 1.0 - (p * kept).sum(1)
    np.testing.assert_allclose(decoded_mass, 1.0 - np.exp(arrays["log_tail"].astype(np.float64)), atol=1e-5)
    np.testing.assert_allclose(1.0 - decoded_mass, true_tail, atol=2e-3 * true_tail.max() + 1e-6)
    # bytes: per sequence, a low section of m (r + bits)-bit words per token, then one unary quotient per entry
    rice = arrays["rice"].astype(int)
    gaps = [np.diff(np.sort(ids[i, : counts[i]]), prepend=-1) - 1 for i in range(n)]
    for i in range(n):  # the per-token Rice parameter is the cheapest one
        cost = [counts[i] * r + int((gaps[i] >> r).sum()) for r in range(enc.id_bits + 1)]
        assert cost[rice[i]] == min(cost)
    expect = 0
    for a, b in [(0, 77), (77, n)]:
        expect += -(-sum(counts[i] * (rice[i] + bits) for i in range(a, b)) // 8)
        expect += -(-sum(int((gaps[i] >> rice[i]).sum()) + counts[i] for i in range(a, b)) // 8)
    assert arrays["entries"].nbytes == expect + 8
    assert list(entries) == [units[1] - units[0], units[2] - units[1]]
    assert enc.num_entries(arrays) == counts.sum()


def test_compact_decodes_any_subset_of_sequences_in_any_order():
    """The reader asks for the sequences of a batch: any subset, in any order, must decode like the whole."""
    k, vocab = 32, 128256
    ids, logprobs = topk_answer(90, vocab, k, sharpness=2.0, seed=3)
    enc = CompactEncoding(k, vocab)
    bounds = [0, 7, 8, 40, 90]
    arrays, entries = enc.pack([enc.encode(ids[a:b], logprobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    units = np.concatenate([[0], np.cumsum(entries)])
    tokens = list(zip(bounds[:-1], bounds[1:]))
    spans = list(zip(units[:-1].tolist(), units[1:].tolist()))
    all_ids, all_lp = enc.decode(arrays, tokens, spans, k)
    for pick in ([2], [3, 0], [1, 3, 2], [0, 1, 2, 3]):
        sub_ids, sub_lp = enc.decode(arrays, [tokens[s] for s in pick], [spans[s] for s in pick], k)
        rows = np.concatenate([np.arange(*tokens[s]) for s in pick])
        np.testing.assert_array_equal(sub_ids, all_ids[rows])
        np.testing.assert_array_equal(sub_lp, all_lp[rows])


def test_bit_streams_round_trip():
    rng = np.random.default_rng(1)
    widths = rng.integers(1, 33, 500)
    words = rng.integers(0, 1 << 62, 500, dtype=np.uint64) & ((np.uint64(1) << widths.astype(np.uint64)) - np.uint64(1))
    stream = pack_varwidth(words, widths)
    assert stream.nbytes == -(-int(widths.sum()) // 8)
    bits = np.unpackbits(stream, bitorder="little").astype(np.uint64)
    starts = np.cumsum(widths) - widths
    for i in range(500):  # word i is bits [start, start + width) of the stream, LSB first
        back = (bits[starts[i] : starts[i] + widths[i]] << np.arange(widths[i], dtype=np.uint64)).sum()
        assert back == words[i]
    values = rng.geometric(0.3, 300) - 1
    parts = [pack_unary(values[:100]), pack_unary(values[100:101]), pack_unary(values[101:])]
    counts = np.ones(300, dtype=np.int64)
    out = unary_decode(parts, counts, np.array([100, 1, 199]))
    np.testing.assert_array_equal(out, values)
    with pytest.raises(ValueError, match="corrupted"):
        unary_decode(parts, counts[:299], np.array([100, 1, 198]))


def test_fill_free_ids_gives_the_smallest_missing_ids():
    rng = np.random.default_rng(2)
    k, n = 12, 40
    counts = rng.integers(1, k + 1, n)
    kept = [np.sort(rng.choice(30, c, replace=False)) for c in counts]
    ids = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        ids[i, : counts[i]] = kept[i]
    row = np.repeat(np.arange(n), counts)
    first = np.cumsum(counts) - counts
    slot = np.arange(counts.sum()) - first[row]
    fill_free_ids(ids, counts, np.concatenate(kept), row, slot)
    for i in range(n):
        missing = [v for v in range(k + 30) if v not in set(kept[i].tolist())][: k - counts[i]]
        assert ids[i, counts[i] :].tolist() == missing
        assert len(set(ids[i].tolist())) == k


def test_scale_code_never_shrinks_the_step():
    steps = np.array([0.0, 1e-6, 2.4e-4, 0.01, 0.1234, 1.0, 3.3, 15.0])
    decoded = decode_scale(encode_scale(steps)).astype(np.float64)
    inside = steps >= 2.0 ** -12
    assert (decoded[inside] >= steps[inside] * (1 - 1e-6)).all()
    assert (decoded[inside] <= steps[inside] * 2 ** (1 / 16) * (1 + 1e-6)).all()  # at most one code step coarser


def test_compact_decode_smaller_k_is_a_prefix():
    ids, logprobs = topk_answer(30, 1000, 64, sharpness=1.0)
    enc = CompactEncoding(64, 1000, mass=0.99)
    arrays, entries = enc.pack([enc.encode(ids, logprobs)])
    full_ids, full_lp = enc.decode(arrays, [(0, 30)], [(0, int(entries[0]))], 64)
    ids8, lp8 = enc.decode(arrays, [(0, 30)], [(0, int(entries[0]))], 8)
    finite = np.isfinite(lp8)
    np.testing.assert_array_equal(ids8[finite], full_ids[:, :8][finite])
    np.testing.assert_array_equal(lp8[finite], full_lp[:, :8][finite])
    assert all(len(set(row.tolist())) == 8 for row in ids8)


def test_compact_is_much_smaller_on_peaked_distributions():
    """A few plausible tokens hold almost all the mass (as for a trained LM): far fewer entries are kept."""
    k, vocab, n = 512, 128256, 64
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((n, vocab))
    for i in range(n):
        logits[i, rng.integers(0, vocab, 20)] += rng.uniform(10, 16, 20)
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    logprobs = np.take_along_axis(logprobs, ids, 1).astype(np.float32)
    naive, compact = NaiveEncoding(k, vocab), CompactEncoding(k, vocab)
    size = {e.name: sum(a.nbytes for a in e.pack([e.encode(ids, logprobs)])[0].values()) for e in (naive, compact)}
    assert size["compact"] <= 0.2 * size["naive"]


@pytest.mark.parametrize("spec,expect", [
    ("naive", {"name": "naive"}),
    ("compact", {"name": "compact", "mass": 0.99, "logprob_bits": 4, "id_bits": 17}),
    ("compact:mass=0.99,bits=6", {"name": "compact", "mass": 0.99, "logprob_bits": 6, "id_bits": 17}),
])
def test_make_encoding_from_cli_string_and_spec(spec, expect):
    enc = make_encoding(spec, 64, 128256)
    assert enc.spec == expect
    assert make_encoding(enc.spec, 64, 128256).spec == expect  # manifest spec round trip


@pytest.mark.parametrize("spec", ["zstd", "compact:foo=1", "compact:mass=1.5", "naive:mass=0.9"])
def test_make_encoding_rejects_unknown(spec):
    with pytest.raises(ValueError):
        make_encoding(spec, 64, 1000)


def test_shard_file_round_trip_is_memory_mapped_and_detects_truncation(tmp_path):
    arrays = {"keys": np.arange(32, dtype=np.uint8).reshape(2, 16), "lengths": np.array([3, 4], "<i4"),
              "logprobs": np.linspace(-3, 0, 14, dtype="<f2").reshape(7, 2)}
    path = str(tmp_path / "shard-00000.safetensors")
    atomic_write_bytes(path, shard_bytes(arrays, {"hello": "world"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]  # no temp file left
    mapped, metadata = open_shard(path)
    assert metadata == {"hello": "world"}
    for name, value in arrays.items():
        np.testing.assert_array_equal(mapped[name], value)
        assert isinstance(mapped[name].base, np.memmap) or isinstance(mapped[name], np.memmap)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_shard_header(path)
    open(path, "wb").write(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        read_shard_header(path)
