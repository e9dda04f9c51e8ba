"""Knowledge-distillation losses computed chunk by chunk from the student's hidden states.

`distillation_loss` is the one entry point the trainer calls. It takes the student's last hidden states (rows
already aligned with their labels and teacher distributions: row i is the hidden state that predicts labels[i],
as `DistillationTrainer.compute_loss` selects them), the student's lm_head, and the teacher's answer (top-k ids +
log-probabilities, or full logits), and returns

    loss = [alpha * sum CE + (1 - alpha) * sum KD + diversity_weight * sum DIV] / num_items

as a differentiable scalar plus the three detached terms for logging.

Why chunked and fused: with V = 128256 a [N, V] fp32 logits tensor for N = 2048 rows is 1 GiB, and autograd
would keep several of them. Here the rows go through the lm_head `chunk_size` at a time; for each chunk the
logits, the loss and d(loss)/d(logits) are computed in fp32 inside the forward (the gradient overwrites the
logits buffer in place), multiplied back through the lm_head into d/d(hidden) and d/d(weight), and only those
two gradients are kept for backward. Peak memory is one chunk's [chunk_size, V] logits (+ its low-precision
copy when the matmul runs in bf16) plus a few [rows_per_block, V] temporaries, whatever the KD kind.

Definitions (P = teacher, Q = student, both at temperature T; "buckets" = the outcomes compared):
- CE: cross-entropy of the student's logits at temperature 1 against `labels`.
- KD buckets: with `teacher_full_logits` the V tokens (P = softmax(teacher_logits / T)); otherwise the
  partition {each of the teacher's top-k ids, the rest of the vocabulary as one "tail" bucket}, with
  P(id) = exp(teacher_logprobs) (already tempered by the source), P(tail) = 1 - sum P(top-k) floored at fp32
  eps (it is only known to that precision), and Q(tail) = the student's exact mass outside the top-k
  (a log-sum-exp over the other V - k logits). The sparse loss is the exact divergence on that partition;
  with k = V the tail is empty and it equals the full-vocabulary loss.
- KD kinds, each multiplied by T^2 (so gradient magnitudes do not shrink as T grows, Hinton et al.):
  forward_kl = KL(P || Q); reverse_kl = KL(Q || P);
  jsd = generalized JSD(beta) of GKD (Agarwal et al. 2024, as TRL's GKDTrainer writes it):
  beta * KL(P || M) + (1 - beta) * KL(Q || M) with the mixture M = beta * P + (1 - beta) * Q.
  For 0 < beta < 1 it is bounded (M never vanishes where P or Q lives). The raw formula is 0 at beta = 0
  and beta = 1, so, as in TRL, the end points are defined as its limits after dividing by beta or
  (1 - beta): beta = 0 is forward KL(P || Q), beta = 1 is reverse KL(Q || P). Small beta behaves
  mode-covering like forward KL, beta near 1 mode-seeking like reverse KL.
- DIV (diversity, entropy gap): relu(H(P) - H(Q)) in nats on the same buckets and temperature as KD, no T^2.
  It is zero while the student is at least as uncertain as the teacher and pushes the student's entropy up
  when it collapses onto the teacher's mode, so the student learns the spread of the distribution too.
- Rows whose label is -100 contribute to no term (the contract expects them filtered out already).
- Normalisation: every term is a SUM over rows divided by `num_items` (the global count of trained tokens
  across gradient-accumulation micro-batches and processes, `num_items_in_batch` in the Trainer), or by the
  number of rows with a label when `num_items` is None. Summing the losses of micro-batches that share one
  `num_items` gives exactly the loss (and gradients) of the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100
# Log-probability used for "probability exactly 0" (an empty tail bucket, or a teacher log-prob of -inf):
# exp(LOG_FLOOR) == 0 in fp32/fp64, yet it keeps every term finite so 0 * log 0 never produces NaN.
LOG_FLOOR = -1.0e4
# Rows per inner block are chosen so that one [rows, V] fp32 temporary holds about this many elements (8 MiB).
_BLOCK_ELEMENTS = 1 << 21
# Floor of the teacher's tail mass 1 - sum(top-k probabilities): fp32 log-probs only pin it down to about this.
_TAIL_EPS = float(torch.finfo(torch.float32).eps)


class LossOutput(NamedTuple):
    """loss: differentiable fp32 scalar; ce / kd / diversity: detached fp32 scalars (each sum / num_items).

    (fp64 scalars when the inputs are fp64, so torch.autograd.gradcheck works.)
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    diversity: torch.Tensor


@dataclass(frozen=True)
class _Settings:
    alpha: float
    temperature: float
    kind: str
    jsd_beta: float
    diversity_weight: float
    chunk_size: int
    need_hidden_grad: bool
    need_weight_grad: bool
    need_bias_grad: bool


# ----------------------------------------------------------------------------------------------------------
# Divergences on buckets, with their gradients written out (no autograd: fewer [rows, V] temporaries).
# Inputs are bucket log-probabilities [rows, B], finite (floored at LOG_FLOOR).
# ----------------------------------------------------------------------------------------------------------


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a_ij * b_ij per row: [rows, B] x [rows, B] -> [rows]."""
    return torch.linalg.vecdot(a, b)


def bucket_terms(logq, logp, kind: str, beta: float, q=None, need_grad: bool = True, need_div_grad: bool = True):
    """KD divergence D(P, Q) and entropy gap relu(H(P) - H(Q)) per row [rows], and their derivatives with respect
    to log Q as if every log Q_b were a free variable, [rows, B] each (None when not needed).

    The derivatives are correct up to adding c_row * Q_b, which the chain rule through the softmax cancels
    (see `_block`), so those terms are left out. q: exp(logq) if the caller already has it.
    """
    q = logq.exp() if q is None else q
    p = logp.exp()
    p_log_p, q_log_q = _rowdot(p, logp), _rowdot(q, logq)  # -H(P), -H(Q)
    gap = q_log_q - p_log_p  # H(P) - H(Q)
    d_kd = d_div = None
    if kind == "jsd" and 0.0 < beta < 1.0:  # M = beta P + (1 - beta) Q
        logm = logp + math.log(beta)
        torch.logaddexp(logm, logq + math.log1p(-beta), out=logm)
        kd = beta * (p_log_p - _rowdot(p, logm)) + (1.0 - beta) * (q_log_q - _rowdot(q, logm))
        if need_grad:  # d/dlogQ = (1 - beta) Q (log Q - log M)
            d_kd = torch.sub(logq, logm, out=logm).mul_(q).mul_(1.0 - beta)
    elif kind == "forward_kl" or kind == "jsd" and beta == 0.0:  # KL(P || Q)
        kd = p_log_p - _rowdot(p, logq)
        if need_grad:  # d/dlogQ = -P
            d_kd = p.neg_()
    else:  # reverse_kl, or jsd with beta = 1: KL(Q || P)
        kd = q_log_q - _rowdot(q, logp)
        if need_grad:  # d/dlogQ = Q (log Q - log P) + Q
            d_kd = torch.sub(logq, logp).mul_(q)
    if need_grad and need_div_grad:  # d/dlogQ of -H(Q) = Q log Q + Q, where the gap is positive
        d_div = (q * logq).mul_((gap > 0).to(q.dtype)[:, None])
    return kd, torch.relu(gap), d_kd, d_div


# ----------------------------------------------------------------------------------------------------------
# One block of rows: values and d(row loss)/d(logits), all in fp32 (fp64 for fp64 inputs).
# Chain rule from bucket log-probs to logits, u = z / T, h_b = d(row loss)/d log Q_b:
#   log Q_b = logsumexp_{j in b}(u_j) - logsumexp_j(u_j)
#   d(row loss)/du_j = h_b(j) * q_j / Q_b(j) - q_j * sum_b h_b      (q_j / Q_b = 1 for single-token buckets)
# so adding c_row * Q_b to h changes nothing (c_row * q_j - q_j * c_row = 0).
# ----------------------------------------------------------------------------------------------------------


def _teacher_topk_buckets(logprobs, has_tail: bool, acc_dtype):
    """[rows, k] teacher top-k log-probs -> [rows, k + 1] bucket log-probs (top-k, tail)."""
    logp = logprobs.to(acc_dtype).clamp_min(LOG_FLOOR)  # [rows, k]
    if has_tail:  # 1 - sum in fp64 ([rows, k] only): the tail can be a small difference of numbers near 1
        tail = (1.0 - logp.double().exp().sum(-1)).clamp_min(_TAIL_EPS).log().to(acc_dtype)  # [rows]
    else:  # k = V: the tail is empty
        tail = torch.full_like(logp[:, 0], LOG_FLOOR)
    return torch.cat([logp, tail[:, None]], dim=-1)


def _tail_column(ids):
    """[rows, k] distinct ids, k < V -> [rows, 1] one token id per row that is NOT among them (one of 0..k)."""
    k = ids.shape[1]
    taken = torch.zeros(ids.shape[0], k + 2, dtype=torch.bool, device=ids.device)
    taken.scatter_(1, ids.clamp_max(k + 1), True)  # ids above k all land in the spare column k + 1
    return (~taken[:, : k + 1]).to(torch.uint8).argmax(-1, keepdim=True)  # k ids cannot fill k + 1 columns


def _full_kd(grad, holder, full, s: _Settings, need_grad: bool):
    """Full-vocabulary KD on one block; adds its gradient w.r.t. the logits into grad. Returns (kd, div).

    holder: [logq [rows, V]], the student's log-probs at temperature T, taken out (and freed here).
    """
    T = s.temperature
    logq = holder.pop()
    q = logq.exp()  # [rows, V]
    x = full.to(logq.dtype, copy=True).div_(T)  # [rows, V] (never touches the caller's tensor)
    logP = torch.log_softmax(x, dim=-1).clamp_min_(LOG_FLOOR)
    del x
    kd, div, d_kd, d_div = bucket_terms(logq, logP, s.kind, s.jsd_beta, q=q, need_grad=need_grad,
                                        need_div_grad=s.diversity_weight > 0)
    del logP, logq
    if need_grad:
        h = d_kd.mul_((1.0 - s.alpha) * T * T)  # [rows, V]
        if d_div is not None:
            h.add_(d_div, alpha=s.diversity_weight)
        grad.addcmul_(q, h.sum(-1, keepdim=True), value=-1.0 / T).add_(h, alpha=1.0 / T)
    return kd, div


def _sparse_kd(grad, holder, ids, logprobs, s: _Settings, need_grad: bool):
    """Top-k + tail KD on one block; adds its gradient w.r.t. the logits into grad. Returns (kd, div).

    holder: [logq [rows, V]], the student's log-probs at temperature T, taken out, overwritten and freed here.
    """
    T = s.temperature
    logq = holder.pop()
    V, k = logq.shape[1], ids.shape[1]
    logQ_top = logq.gather(1, ids)  # [rows, k]
    # Slots a compact cache left empty (teacher log-prob -inf, distinct fill ids) belong to the tail bucket,
    # for the student as for the teacher; they are no buckets of their own.
    empty = logprobs == float("-inf")  # [rows, k]
    share = None
    if k < V:
        j = _tail_column(ids)  # [rows, 1] a tail token: log Q_tail = log q_j - log(q_j / Q_tail)
        logq_j = logq.gather(1, j)
        outside = torch.where(empty, logQ_top, float("-inf"))  # the kept top-k leaves the tail, empty slots stay
        share = torch.log_softmax(logq.scatter_(1, ids, outside), dim=-1)  # [rows, V] log(q_j / Q_tail)
        logQ_tail = (logq_j - share.gather(1, j)).clamp_min(LOG_FLOOR)  # [rows, 1]
    else:  # k = V: no tail
        logQ_tail = torch.full_like(logQ_top[:, :1], LOG_FLOOR)
    del logq
    logQ_top = logQ_top.masked_fill(empty, LOG_FLOOR)
    logQ = torch.cat([logQ_top, logQ_tail], dim=-1)  # [rows, k + 1]
    logP = _teacher_topk_buckets(logprobs, k < V, logQ.dtype)  # [rows, k + 1]
    kd, div, d_kd, d_div = bucket_terms(logQ, logP, s.kind, s.jsd_beta, need_grad=need_grad,
                                        need_div_grad=s.diversity_weight > 0)
    if need_grad:
        h = d_kd.mul_((1.0 - s.alpha) * T * T)  # [rows, k + 1]
        if d_div is not None:
            h.add_(d_div, alpha=s.diversity_weight)
        h_sum = h.sum(-1, keepdim=True)  # [rows, 1]
        Q = logQ.exp()
        # top-k token i: (h_i - Q_i sum h) / T;  tail token j: (q_j / Q_tail) (h_tail - Q_tail sum h) / T
        grad.scatter_add_(1, ids, ((h[:, :-1] - Q[:, :-1] * h_sum) / T).masked_fill_(empty, 0.0))
        if share is not None:
            grad.addcmul_(share.exp_(), (h[:, -1:] - Q[:, -1:] * h_sum) / T)
    return kd, div


def _block(z, labels, ids, logprobs, full, s: _Settings, need_grad: bool):
    """z: [rows, V] fp32 student logits. Returns per-row ce, kd, div [rows] and d(row loss)/dz [rows, V].

    Every normalisation is a fused log_softmax (far faster than logsumexp on CPU), and at most a few
    [rows, V] temporaries exist at once.
    """
    T = s.temperature
    logp1 = torch.log_softmax(z, dim=-1)  # [rows, V] student at temperature 1
    target = labels.clamp_min(0)[:, None]  # [rows, 1]
    ce = -logp1.gather(1, target).squeeze(1)
    grad = None
    if need_grad:  # d(alpha * CE)/dz = alpha * (softmax(z) - onehot(label))
        grad = logp1.exp_().mul_(s.alpha).scatter_add_(1, target, torch.full_like(ce[:, None], -s.alpha))
    del logp1
    if ids is None and full is None:
        zero = torch.zeros_like(ce)
        return ce, zero, zero, grad
    # The student at temperature T (recomputed even for T = 1: a fused pass is cheaper than keeping a buffer).
    # Handed over in a list so the helper holds the only reference and can free or overwrite it.
    logq = [torch.log_softmax(z if T == 1.0 else z / T, dim=-1)]  # [rows, V]
    need_kd_grad = need_grad and (s.alpha < 1.0 or s.diversity_weight > 0)
    if full is not None:
        kd, div = _full_kd(grad, logq, full, s, need_kd_grad)
    else:
        kd, div = _sparse_kd(grad, logq, ids, logprobs, s, need_kd_grad)
    return ce, kd * (T * T), div, grad


# ----------------------------------------------------------------------------------------------------------
# The chunk loop and the fused autograd function.
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when autocast is on for this device, else the lm_head's."""
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _chunk(h_c, W, b, labels, ids, logprobs, full, valid, row_weight, s: _Settings, acc, need_grad,
           grad_h, grad_w, grad_b):
    """One chunk of c rows: returns the [3] sums (ce, kd, div); adds its gradients into grad_h/grad_w/grad_b.

    A function of its own so that every [c, V] buffer is freed before the next chunk allocates its own.
    """
    V = W.shape[0]
    logits = nn.functional.linear(h_c, W, b)  # [c, V] in the matmul dtype
    Z = logits.to(acc)  # [c, V] fp32; overwritten in place by d(loss)/d(logits), block by block
    if not need_grad:
        del logits  # (when the matmul already ran in fp32, Z is logits and stays)
    sums = torch.zeros(3, dtype=acc, device=Z.device)
    block = max(1, _BLOCK_ELEMENTS // V)
    for r0 in range(0, Z.shape[0], block):
        r = slice(r0, r0 + block)
        z = Z[r]  # [rows, V] view
        ce, kd, div, grad = _block(
            z, labels[r], ids[r] if ids is not None else None, logprobs[r] if logprobs is not None else None,
            full[r] if full is not None else None, s, need_grad,
        )
        sums += torch.stack([torch.where(valid[r], t, 0.0).sum() for t in (ce, kd, div)])
        if need_grad:
            z.copy_(grad.mul_(row_weight[r, None]))
    if not need_grad:
        return sums
    G = Z if logits.dtype == Z.dtype else logits.copy_(Z)  # [c, V] d(loss)/d(logits) in the matmul dtype
    if grad_b is not None:
        grad_b += Z.sum(0)
    del Z
    if grad_h is not None:
        grad_h.copy_(G @ W)
    if grad_w is not None:
        if grad_w.dtype == G.dtype:
            grad_w.addmm_(G.t(), h_c)
        else:  # autocast: fp32 parameter, bf16 matmul
            grad_w.add_(G.t() @ h_c)
    return sums


def _run(hidden, weight, bias, labels, ids, logprobs, full, denom, s: _Settings, need_grad: bool):
    """Loop over chunks of rows; returns (loss, ce, kd, div, grad_hidden, grad_weight, grad_bias)."""
    N, H = hidden.shape
    V = weight.shape[0]
    cdt = _compute_dtype(weight)
    acc = torch.promote_types(cdt, torch.float32)  # fp32 reductions (fp64 stays fp64)
    W = weight.to(cdt)  # [V, H]
    b = bias.to(cdt) if bias is not None else None
    valid = labels != IGNORE_INDEX  # [N]
    row_weight = valid.to(acc) / denom  # [N]
    sums = torch.zeros(3, dtype=acc, device=hidden.device)  # ce, kd, div
    grad_h = torch.empty_like(hidden) if need_grad and s.need_hidden_grad else None
    grad_w = torch.zeros_like(weight) if need_grad and s.need_weight_grad else None
    grad_b = torch.zeros(V, dtype=acc, device=hidden.device) if need_grad and s.need_bias_grad else None
    sparse = full is None and ids is not None
    for c0 in range(0, N, s.chunk_size):
        rows = slice(c0, min(N, c0 + s.chunk_size))
        sums += _chunk(
            hidden[rows].to(cdt), W, b, labels[rows], ids[rows] if sparse else None,
            logprobs[rows] if sparse else None, full[rows] if full is not None else None, valid[rows],
            row_weight[rows], s, acc, need_grad,
            grad_h[rows] if grad_h is not None else None, grad_w, grad_b,
        )
    ce, kd, div = (sums / denom).unbind()
    loss = s.alpha * ce + (1.0 - s.alpha) * kd + s.diversity_weight * div
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return loss, ce, kd, div, grad_h, grad_w, grad_b  # scalars in fp32 (fp64 for fp64 inputs)


class _FusedDistillationLoss(torch.autograd.Function):
    """Forward computes the loss AND its gradients chunk by chunk; backward only scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ids, logprobs, full, denom, settings):
        loss, ce, kd, div, grad_h, grad_w, grad_b = _run(
            hidden, weight, bias, labels, ids, logprobs, full, denom, settings, need_grad=True
        )
        # Saved (not stored on ctx) so autograd frees these [N, H] / [V, H] tensors right after backward.
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(ce, kd, div)
        return loss, ce, kd, div

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = ctx.saved_tensors
        # loss.backward() passes 1: hand the saved gradients over as they are (autograd frees its own reference
        # right after this node, so the lm_head's [V, H] gradient is never copied). Anything else: scale a copy.
        if float(grad_loss) != 1.0:
            grads = tuple(g * grad_loss.to(g.dtype) if g is not None else None for g in grads)
        return (*grads, None, None, None, None, None, None)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _validate(hidden, weight, bias, labels, teacher_ids, teacher_logprobs, teacher_full_logits, *, alpha,
              temperature, kind, jsd_beta, diversity_weight, chunk_size, num_items):
    _check(kind in KINDS, f"kd loss kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    _check(isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0,
           f"alpha={alpha!r} must be a number in [0, 1] (the weight of CE; 1 - alpha weights KD)")
    _check(isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0,
           f"temperature={temperature!r} must be a finite number > 0")
    _check(isinstance(jsd_beta, (int, float)) and 0.0 <= jsd_beta <= 1.0, f"jsd_beta={jsd_beta!r} must be in [0, 1]")
    _check(isinstance(diversity_weight, (int, float)) and math.isfinite(diversity_weight) and diversity_weight >= 0,
           f"diversity_weight={diversity_weight!r} must be a finite number >= 0")
    _check(isinstance(chunk_size, int) and chunk_size >= 1, f"chunk_size={chunk_size!r} must be an integer >= 1")
    _check(hidden.dim() == 2, f"hidden must be [N, H] (rows already flattened and filtered); got {tuple(hidden.shape)}")
    N, H = hidden.shape
    _check(weight.dim() == 2 and weight.shape[1] == H,
           f"lm_head weight {tuple(weight.shape)} does not match hidden size {H}; expected [V, {H}]")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"lm_head bias {tuple(bias.shape)} should be [{V}]")
    _check(tuple(labels.shape) == (N,) and not labels.is_floating_point(),
           f"labels must be integer [N={N}]; got {labels.dtype} {tuple(labels.shape)}")
    if N and bool(((labels < 0) & (labels != IGNORE_INDEX)).any() | (labels >= V).any()):
        raise ValueError(f"labels must be token ids in [0, {V}) or {IGNORE_INDEX}")
    if teacher_full_logits is not None:
        _check(tuple(teacher_full_logits.shape) == (N, V),
               f"teacher_full_logits {tuple(teacher_full_logits.shape)} should be [N={N}, V={V}]; teacher and "
               "student vocabularies must agree")
    elif teacher_ids is not None or teacher_logprobs is not None:
        _check(teacher_ids is not None and teacher_logprobs is not None,
               "give both teacher_ids and teacher_logprobs (or teacher_full_logits)")
        _check(teacher_ids.dim() == 2 and teacher_ids.shape[0] == N,
               f"teacher_ids {tuple(teacher_ids.shape)} should be [N={N}, k]")
        _check(tuple(teacher_logprobs.shape) == tuple(teacher_ids.shape),
               f"teacher_logprobs {tuple(teacher_logprobs.shape)} must have the shape of teacher_ids "
               f"{tuple(teacher_ids.shape)}")
        k = teacher_ids.shape[1]
        _check(1 <= k <= V, f"teacher top-k k={k} must be in [1, vocab size V={V}]; lower teacher_topk")
        _check(not teacher_ids.is_floating_point(), f"teacher_ids must be integer token ids; got {teacher_ids.dtype}")
        if N and bool((teacher_ids.min() < 0) | (teacher_ids.max() >= V)):
            raise ValueError(f"teacher_ids must be in [0, {V}); teacher and student vocabularies must agree")
        if N and k > 1:
            ordered = teacher_ids.sort(dim=-1).values
            if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
                raise ValueError("teacher_ids repeat a token within a row; each row must hold k distinct ids")
    has_teacher = teacher_full_logits is not None or teacher_ids is not None
    _check(has_teacher or (alpha == 1.0 and diversity_weight == 0.0),
           f"alpha={alpha} < 1 or diversity_weight={diversity_weight} > 0 needs the teacher: pass teacher_ids + "
           "teacher_logprobs or teacher_full_logits")
    if num_items is not None:
        n = float(num_items)
        _check(math.isfinite(n) and n > 0, f"num_items={n} must be > 0 (the number of trained tokens)")


def distillation_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    teacher_full_logits: torch.Tensor | None = None,
    *,
    alpha: float,
    temperature: float,
    kind: str,
    jsd_beta: float = 0.5,
    diversity_weight: float = 0.0,
    chunk_size: int = 1024,
    num_items: int | float | torch.Tensor | None = None,
) -> LossOutput:
    """alpha * CE + (1 - alpha) * KD + diversity_weight * DIV over N aligned rows, chunked through the lm_head.

    Args:
        hidden: [N, H] student hidden states (row i predicts labels[i]), any float dtype.
        lm_head: the student's output layer (`nn.Linear`, weight [V, H], optional bias [V]).
        labels: [N] int64 next-token ids; -100 rows contribute nothing.
        teacher_ids, teacher_logprobs: [N, k] the teacher's top-k ids and log-probabilities at `temperature`
            (as `TeacherSource.topk` returns them); used for the sparse loss with a tail bucket.
        teacher_full_logits: [N, V] raw teacher logits (temperature NOT applied); when given, the
            full-vocabulary loss is used and the top-k tensors are ignored.
        alpha: CE weight in [0, 1]. temperature: > 0, applied to the student (and to full teacher logits).
        kind: "forward_kl" | "reverse_kl" | "jsd". jsd_beta: the GKD mixture weight in [0, 1].
        diversity_weight: weight of the entropy-gap term (>= 0).
        chunk_size: rows per lm_head chunk; peak memory is about one [chunk_size, V] fp32 buffer.
        num_items: the divisor of every token sum (global trained-token count); None = rows with a label.
    """
    weight = lm_head.weight
    bias = getattr(lm_head, "bias", None)
    _validate(hidden, weight, bias, labels, teacher_ids, teacher_logprobs, teacher_full_logits, alpha=alpha,
              temperature=temperature, kind=kind, jsd_beta=jsd_beta, diversity_weight=diversity_weight,
              chunk_size=chunk_size, num_items=num_items)
    labels = labels.long()
    ids = teacher_ids.long() if teacher_ids is not None and teacher_full_logits is None else None
    logprobs = teacher_logprobs if ids is not None else None
    if num_items is None:
        denom = float(max(1, int((labels != IGNORE_INDEX).sum())))
    else:
        denom = float(num_items)
    grad_on = torch.is_grad_enabled()
    settings = _Settings(
        alpha=float(alpha), temperature=float(temperature), kind=kind, jsd_beta=float(jsd_beta),
        diversity_weight=float(diversity_weight), chunk_size=chunk_size,
        need_hidden_grad=grad_on and hidden.requires_grad,
        need_weight_grad=grad_on and weight.requires_grad,
        need_bias_grad=grad_on and bias is not None and bias.requires_grad,
    )
    if settings.need_hidden_grad or settings.need_weight_grad or settings.need_bias_grad:
        out = _FusedDistillationLoss.apply(hidden, weight, bias, labels, ids, logprobs, teacher_full_logits,
                                           denom, settings)
        return LossOutput(*out)
    loss, ce, kd, div, *_ = _run(hidden, weight, bias, labels, ids, logprobs, teacher_full_logits, denom,
                                 settings, need_grad=False)
    return LossOutput(loss, ce, kd, div)
