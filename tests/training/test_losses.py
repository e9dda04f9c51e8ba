"""training.trainers.losses.distillation_loss against plain full-logits reference implementations (values and gradients)."""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.trainers.losses import KINDS, distillation_loss

FP32_EPS = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------------------
# The reference: every loss written plainly on the full [N, V] logits in fp64, differentiated by autograd.
# ------------------------------------------------------------------------------------------------------------


def kl(p, q):
    """KL(p || q) per row with 0 log 0 = 0, on probabilities [N, B]."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def divergence(p, q, kind, beta):
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def entropy(p):
    return -torch.xlogy(p, p).sum(-1)


def reference_loss(hidden, lm_head, labels, ids, logprobs, full, *, alpha, temperature, kind, jsd_beta=0.5,
                   diversity_weight=0.0, num_items=None):
    """Materialises [N, V]; returns (loss, ce, kd, div) as fp64 scalars, loss differentiable."""
    logits = lm_head(hidden).double()  # the matmul in the inputs' dtype, like the chunked code
    V = logits.shape[-1]
    valid = labels != -100
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    q = torch.softmax(logits / temperature, dim=-1)
    if full is not None:
        p, q_b = torch.softmax(full.double() / temperature, dim=-1), q
    else:
        p_top, q_top = logprobs.double().exp(), q.gather(1, ids)
        if ids.shape[1] == V:  # no tail bucket
            p, q_b = p_top, q_top
        else:
            p_tail = (1 - p_top.sum(-1, keepdim=True)).clamp_min(FP32_EPS)
            rest = torch.ones_like(q, dtype=torch.bool).scatter(1, ids, False)  # tokens outside the top-k
            q_tail = (logits / temperature).masked_fill(~rest, float("-inf")).logsumexp(-1, keepdim=True)
            q_tail = (q_tail - torch.logsumexp(logits / temperature, -1, keepdim=True)).exp()
            p, q_b = torch.cat([p_top, p_tail], -1), torch.cat([q_top, q_tail], -1)
    kd = temperature**2 * divergence(p, q_b, kind, jsd_beta)
    div = torch.relu(entropy(p) - entropy(q_b))
    denom = num_items if num_items is not None else max(1, int(valid.sum()))
    terms = [(t * valid).sum() / denom for t in (ce, kd, div)]
    loss = alpha * terms[0] + (1 - alpha) * terms[1] + diversity_weight * terms[2]
    return loss, *[t.detach() for t in terms]


# ------------------------------------------------------------------------------------------------------------
# Small random problems.
# ------------------------------------------------------------------------------------------------------------


def make_problem(N=19, H=16, V=37, k=6, dtype=torch.float32, temperature=1.0, bias=False, seed=0):
    """Student hidden/lm_head and a teacher whose sharpness varies by row (so the entropy gap has both signs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 0.7).to(dtype).requires_grad_()
    lm_head = nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
        if bias:
            lm_head.bias.copy_(torch.randn(V, generator=g))
    lm_head.to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    scale = torch.linspace(0.3, 4.0, N)[:, None]
    full = torch.randn(N, V, generator=g) * scale  # [N, V] raw teacher logits
    values, ids = torch.log_softmax(full / temperature, dim=-1).topk(k, dim=-1)
    return dict(hidden=hidden, lm_head=lm_head, labels=labels, ids=ids, logprobs=values, full=full)


def grads(loss, pb):
    params = [pb["hidden"], *pb["lm_head"].parameters()]
    return torch.autograd.grad(loss, params)


def run_both(pb, mode, **kw):
    """(ours, reference) LossOutput-like tuples and their gradients w.r.t. hidden and lm_head parameters."""
    full = pb["full"] if mode == "full" else None
    ours = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full, **kw)
    ref_kw = {key: v for key, v in kw.items() if key != "chunk_size"}
    ref = reference_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full, **ref_kw)
    return ours, grads(ours.loss, pb), ref, grads(ref[0], pb)


def assert_close_grads(ours, ref, rtol, atol_frac):
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        atol = atol_frac * float(b.abs().max()) + 1e-12
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------------------
# Values and gradients equal the reference.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mode", ["sparse", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, mode, temperature, chunk_size, dtype):
    pb = make_problem(dtype=dtype, temperature=temperature, seed=zlib.crc32(f"{kind}{mode}{temperature}".encode()))
    ours, g_ours, ref, g_ref = run_both(pb, mode, alpha=0.3, temperature=temperature, kind=kind, jsd_beta=0.3,
                                        diversity_weight=0.2, chunk_size=chunk_size)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32 and a.dim() == 0
        torch.testing.assert_close(a.double(), b.double(), **tol)
    assert float(ref[3]) > 0.01, "the problem should exercise the diversity term"
    if dtype == torch.float32:
        assert_close_grads(g_ours, g_ref, rtol=1e-4, atol_frac=1e-5)
    else:  # both sides round d(loss)/d(logits) to bf16 before the matmuls; ours also sums chunks in bf16
        assert_close_grads(g_ours, g_ref, rtol=3e-2, atol_frac=2e-2)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_jsd_beta_and_its_limits(beta, mode):
    pb = make_problem(temperature=1.5)
    kw = dict(alpha=0.0, temperature=1.5, chunk_size=7)
    ours, g_ours, ref, g_ref = run_both(pb, mode, kind="jsd", jsd_beta=beta, **kw)
    torch.testing.assert_close(ours.kd.double(), ref[2], rtol=1e-5, atol=1e-6)
    assert_close_grads(g_ours, g_ref, rtol=1e-4, atol_frac=1e-5)
    # documented convention: beta = 0 is forward KL(P || Q), beta = 1 is reverse KL(Q || P)
    full = pb["full"] if mode == "full" else None
    args = (pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full)
    if beta in (0.0, 1.0):
        same = distillation_loss(*args, kind="forward_kl" if beta == 0.0 else "reverse_kl", **kw)
        torch.testing.assert_close(ours.kd, same.kd)
    else:  # the interior is bounded: JSD(beta) <= -log of the mixture weight (in T^2 units)
        assert 0 < float(ours.kd) < 1.5**2 * (beta * -math.log(beta) + (1 - beta) * -math.log(1 - beta))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_sparse_with_k_equal_V_equals_full_vocabulary(kind, temperature):
    pb = make_problem(k=37, V=37, temperature=temperature)
    kw = dict(alpha=0.25, temperature=temperature, kind=kind, diversity_weight=0.3, chunk_size=4)
    sparse = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None, **kw)
    g_sparse = grads(sparse.loss, pb)
    full = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, pb["full"], **kw)
    g_full = grads(full.loss, pb)
    for a, b in zip(sparse, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_close_grads(g_sparse, g_full, rtol=1e-4, atol_frac=1e-5)


def test_sparse_forward_kl_exact_on_the_partition_and_below_full_kl():
    """With k < V the sparse loss is KL between the coarsened distributions: never above the full KL."""
    pb = make_problem(k=5, temperature=1.0)
    kw = dict(alpha=0.0, temperature=1.0, kind="forward_kl")
    sparse = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None, **kw)
    full = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, pb["full"], **kw)
    assert 0 < float(sparse.kd) < float(full.kd)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_gradcheck_fp64(kind, mode):
    """Finite differences on fp64 inputs: the hand-written chain rule through buckets is the true gradient."""
    pb = make_problem(N=6, H=5, V=11, k=3, dtype=torch.float64, bias=True)
    lm_head = pb["lm_head"]
    full = pb["full"] if mode == "full" else None

    def f(hidden, weight, bias):
        return distillation_loss(hidden, _Head(weight, bias), pb["labels"], pb["ids"], pb["logprobs"], full,
                                 alpha=0.4, temperature=1.3, kind=kind, diversity_weight=0.3, chunk_size=4).loss

    inputs = (pb["hidden"].detach().requires_grad_(), lm_head.weight.detach().requires_grad_(),
              lm_head.bias.detach().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


class _Head(nn.Module):
    """An lm_head whose weight/bias are arbitrary tensors (for gradcheck)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


# ------------------------------------------------------------------------------------------------------------
# Chunking and normalisation.
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sparse", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind, mode):
    pb = make_problem(N=23)
    full = pb["full"] if mode == "full" else None
    args = (pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full)
    kw = dict(alpha=0.5, temperature=2.0, kind=kind, diversity_weight=0.1)
    one = distillation_loss(*args, chunk_size=23, **kw)
    g_one = grads(one.loss, pb)
    for chunk_size in (1, 4, 10):
        many = distillation_loss(*args, chunk_size=chunk_size, **kw)
        for a, b in zip(many, one):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert_close_grads(grads(many.loss, pb), g_one, rtol=1e-5, atol_frac=1e-6)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_num_items_makes_half_batches_add_up_to_the_full_batch(mode):
    pb = make_problem(N=20)
    full = pb["full"] if mode == "full" else None
    kw = dict(alpha=0.3, temperature=2.0, kind="forward_kl", diversity_weight=0.2, chunk_size=3)
    whole = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full, **kw)
    g_whole = grads(whole.loss, pb)
    total, acc = [torch.zeros(()) for _ in range(4)], None
    for rows in (slice(0, 8), slice(8, 20)):  # unequal halves, like micro-batches with different token counts
        part = distillation_loss(pb["hidden"][rows], pb["lm_head"], pb["labels"][rows], pb["ids"][rows],
                                 pb["logprobs"][rows], None if full is None else full[rows], num_items=20, **kw)
        g = grads(part.loss, pb)
        acc = g if acc is None else [a + b for a, b in zip(acc, g)]
        total = [t + x.detach() for t, x in zip(total, part)]
    for a, b in zip(total, whole):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    assert_close_grads(acc, g_whole, rtol=1e-5, atol_frac=1e-6)
    # a num_items tensor (as the Trainer passes num_items_in_batch) is a divisor like any number
    doubled = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full,
                                num_items=torch.tensor(40), **kw)
    torch.testing.assert_close(doubled.loss * 2, whole.loss)


def test_ignored_rows_contribute_nothing():
    pb = make_problem(N=12)
    labels = pb["labels"].clone()
    labels[[1, 5, 6]] = -100
    keep = labels != -100
    kw = dict(alpha=0.5, temperature=1.0, kind="reverse_kl", diversity_weight=0.1, chunk_size=5)
    masked = distillation_loss(pb["hidden"], pb["lm_head"], labels, pb["ids"], pb["logprobs"], None, **kw)
    kept = distillation_loss(pb["hidden"][keep], pb["lm_head"], labels[keep], pb["ids"][keep],
                             pb["logprobs"][keep], None, **kw)
    for a, b in zip(masked, kept):
        torch.testing.assert_close(a, b)
    g = grads(masked.loss, pb)
    assert g[0][~keep].abs().max() == 0


def test_ce_only_is_cross_entropy_and_needs_no_teacher():
    pb = make_problem()
    out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, alpha=1.0, temperature=3.0,
                            kind="forward_kl", chunk_size=4)
    ref = F.cross_entropy(pb["lm_head"](pb["hidden"]), pb["labels"])
    torch.testing.assert_close(out.loss, ref)
    assert float(out.kd) == 0 and float(out.diversity) == 0
    assert_close_grads(grads(out.loss, pb), grads(ref, pb), rtol=1e-4, atol_frac=1e-6)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_a_rank_without_trained_tokens_gets_zero_loss_and_zero_gradients(mode):
    pb = make_problem()
    rows = slice(0, 0)
    full = pb["full"][rows] if mode == "full" else None
    out = distillation_loss(pb["hidden"][rows], pb["lm_head"], pb["labels"][rows], pb["ids"][rows],
                            pb["logprobs"][rows], full, alpha=0.5, temperature=2.0, kind="jsd", num_items=7)
    assert float(out.loss.detach()) == 0
    assert all(float(g.abs().sum()) == 0 for g in grads(out.loss, pb))


def test_without_grad_gives_the_same_values_and_no_graph():
    pb = make_problem()
    args = (pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None)
    kw = dict(alpha=0.5, temperature=2.0, kind="jsd", diversity_weight=0.2, chunk_size=5)
    with_grad = distillation_loss(*args, **kw)
    with torch.no_grad():
        without = distillation_loss(*args, **kw)
    assert without.loss.grad_fn is None and with_grad.loss.grad_fn is not None
    for a, b in zip(without, with_grad):
        torch.testing.assert_close(a, b.detach())


# ------------------------------------------------------------------------------------------------------------
# The diversity term.
# ------------------------------------------------------------------------------------------------------------


def test_diversity_penalises_only_a_student_sharper_than_the_teacher():
    pb = make_problem(N=8, V=30, k=30)
    flat_teacher = torch.zeros(8, 30)  # maximal entropy
    with torch.no_grad():
        pb["lm_head"].weight.mul_(4.0)  # a sharp student
    kw = dict(alpha=1.0, temperature=1.0, kind="forward_kl", diversity_weight=1.0)
    out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, flat_teacher, **kw)
    assert float(out.diversity) > 0.5
    # one gradient step on the diversity term alone (gradient with weight 1 minus gradient with weight 0)
    with_div, without_div = (
        distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, flat_teacher,
                          **{**kw, "diversity_weight": w}).loss
        for w in (1.0, 0.0)
    )
    (gw,) = torch.autograd.grad(with_div - without_div, pb["lm_head"].weight)
    with torch.no_grad():
        pb["lm_head"].weight.sub_(0.5 * gw)
    after = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, flat_teacher, **kw)
    assert float(after.diversity) < float(out.diversity)
    # a near-one-hot teacher: the student is the more uncertain one, nothing to penalise
    sharp_teacher = F.one_hot(pb["labels"], 30).float() * 50
    out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], None, None, sharp_teacher, **kw)
    assert float(out.diversity) == 0


# ------------------------------------------------------------------------------------------------------------
# Real student, autocast, odd teachers.
# ------------------------------------------------------------------------------------------------------------


def test_real_tiny_llama_student_tied_embeddings():
    from tests.tiny_models import build_tiny_llama

    model = build_tiny_llama(vocab_size=97, hidden_size=32, num_layers=2)
    input_ids = torch.randint(0, 97, (2, 12))
    teacher_logits = torch.randn(2, 12, 97) * 2

    def rows():
        hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1].reshape(-1, 32)  # [N, H]
        return hidden, input_ids[:, 1:].reshape(-1), teacher_logits[:, :-1].reshape(-1, 97)

    kw = dict(alpha=0.5, temperature=2.0, kind="forward_kl", diversity_weight=0.1)
    hidden, labels, full = rows()
    values, ids = torch.log_softmax(full / 2.0, -1).topk(8, -1)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = distillation_loss(hidden, model.get_output_embeddings(), labels, ids, values, None, chunk_size=5, **kw)
    g_ours = torch.autograd.grad(ours.loss, params)
    hidden, labels, full = rows()
    ref = reference_loss(hidden, model.get_output_embeddings(), labels, ids, values, None, **kw)
    g_ref = torch.autograd.grad(ref[0], params)
    torch.testing.assert_close(ours.loss.double(), ref[0], rtol=1e-5, atol=1e-6)
    assert_close_grads(g_ours, g_ref, rtol=1e-3, atol_frac=1e-5)


def test_cpu_autocast_bf16_keeps_fp32_parameters():
    pb = make_problem()
    kw = dict(alpha=0.5, temperature=2.0, kind="forward_kl", chunk_size=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None, **kw)
        g = grads(out.loss, pb)
    kw.pop("chunk_size")
    ref = reference_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None, **kw)
    assert all(t.dtype == torch.float32 for t in g)
    torch.testing.assert_close(out.loss.double(), ref[0], rtol=2e-2, atol=2e-2)
    assert_close_grads(g, grads(ref[0], pb), rtol=5e-2, atol_frac=3e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_bias_and_teacher_minus_inf_logprobs_stay_finite(kind):
    pb = make_problem(bias=True, k=8)
    logprobs = pb["logprobs"].clone()
    logprobs[:, -2:] = float("-inf")  # a teacher that masks some tokens
    out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], logprobs, None, alpha=0.5,
                            temperature=1.0, kind=kind, diversity_weight=0.1, chunk_size=4)
    g = grads(out.loss, pb)
    assert torch.isfinite(out.loss) and all(torch.isfinite(t).all() for t in g)
    assert g[2].abs().sum() > 0  # the bias gets a gradient


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_empty_slots_belong_to_the_tail(kind, temperature):
    """A compact cache leaves slots empty (log-prob -inf, distinct fill ids): the loss must equal the loss on the
    kept ids alone, whose tail holds the same mass, for every kind (values and gradients)."""
    pb = make_problem(k=8, temperature=temperature)
    kept = 5
    filled = pb["logprobs"].clone()
    filled[:, kept:] = float("-inf")
    kw = dict(alpha=0.3, temperature=temperature, kind=kind, diversity_weight=0.1, chunk_size=4)
    with_fill = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], filled, None, **kw)
    alone = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"][:, :kept],
                              pb["logprobs"][:, :kept].contiguous(), None, **kw)
    for a, b in zip(with_fill, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads(with_fill.loss, pb), grads(alone.loss, pb), rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_stay_exact(kind):
    """A student almost certain of its top tokens: its tail mass (< 1e-39) is below fp32's normal range."""
    pb = make_problem(k=4, temperature=1.0)
    with torch.no_grad():
        pb["lm_head"].weight.mul_(60.0)
        logits = pb["lm_head"](pb["hidden"])
        pb["logprobs"], pb["ids"] = torch.log_softmax(logits * 0.05, -1).topk(4, -1)  # same top tokens, softer
        q = torch.log_softmax(logits.double(), -1)
        tail = q.scatter(1, pb["ids"], float("-inf")).logsumexp(-1)
    assert int((tail < -90).sum()) >= 5  # exp() of it underflows fp32 in several rows
    ours, g_ours, ref, g_ref = run_both(pb, "sparse", alpha=0.2, temperature=1.0, kind=kind, diversity_weight=0.1)
    assert all(torch.isfinite(t) for t in ours) and all(torch.isfinite(g).all() for g in g_ours)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    assert_close_grads(g_ours, g_ref, rtol=1e-3, atol_frac=1e-4)


def test_inputs_are_left_untouched():
    pb = make_problem()
    before = {name: t.detach().clone() for name, t in pb.items() if isinstance(t, torch.Tensor)}
    for full in (None, pb["full"]):
        out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], full,
                                alpha=0.5, temperature=2.0, kind="jsd", diversity_weight=0.1, chunk_size=4)
        out.loss.backward()
    for name, t in before.items():
        assert torch.equal(pb[name], t), name


def test_backward_twice_with_retain_graph_scales_like_autograd():
    pb = make_problem()
    out = distillation_loss(pb["hidden"], pb["lm_head"], pb["labels"], pb["ids"], pb["logprobs"], None,
                            alpha=0.5, temperature=1.0, kind="forward_kl")
    (g1,) = torch.autograd.grad(out.loss, pb["hidden"], retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * out.loss, pb["hidden"])
    torch.testing.assert_close(g3, 3.0 * g1)


# ------------------------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors.
# ------------------------------------------------------------------------------------------------------------


def _bad(pb, **change):
    args = dict(hidden=pb["hidden"], lm_head=pb["lm_head"], labels=pb["labels"], teacher_ids=pb["ids"],
                teacher_logprobs=pb["logprobs"], teacher_full_logits=None, alpha=0.5, temperature=1.0,
                kind="forward_kl")
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="kl"), "unknown"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-2.0), "temperature"),
        (dict(jsd_beta=1.2, kind="jsd"), "jsd_beta"),
        (dict(diversity_weight=-1.0), "diversity_weight"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(num_items=0), "num_items"),
        (dict(teacher_ids=torch.zeros(19, 40, dtype=torch.long), teacher_logprobs=torch.zeros(19, 40)),
         "larger|k=40"),
        (dict(teacher_logprobs=torch.zeros(19, 5)), "shape of teacher_ids"),
        (dict(teacher_ids=torch.zeros(18, 6, dtype=torch.long)), r"\[N=19, k\]"),
        (dict(teacher_ids=torch.full((19, 6), 37)), "vocabularies"),
        (dict(teacher_ids=torch.zeros(19, 6, dtype=torch.long)), "distinct"),
        (dict(teacher_full_logits=torch.zeros(19, 40)), "vocabularies must agree"),
        (dict(labels=torch.zeros(18, dtype=torch.long)), "labels"),
        (dict(labels=torch.full((19,), 99)), "labels"),
        (dict(hidden=torch.zeros(19, 15)), "hidden size"),
        (dict(hidden=torch.zeros(2, 19, 16)), r"\[N, H\]"),
        (dict(teacher_ids=None, teacher_logprobs=None), "needs the teacher"),
        (dict(teacher_logprobs=None), "both"),
    ],
)
def test_bad_input_is_a_clear_value_error(change, message):
    pb = make_problem()
    with pytest.raises(ValueError, match=message):
        distillation_loss(**_bad(pb, **change))
