"""Memory-bounded log-probabilities and entropies, from logits or from hidden states.

With a realistic vocabulary (Qwen: V = 151936) the naive
``log_softmax(logits.float() / t).gather(-1, labels)`` materialises several full ``[N, V]`` fp32
tensors (upcast copy, scaled copy, log-softmax output, and as many again in backward). The
functions here work on row chunks instead:

* forward: for each chunk of ``chunk_size`` rows, upcast + scale the chunk into a workspace,
  gather the label logit and take the logsumexp in place. The one ``[chunk_size, V]`` fp32
  workspace (two for the entropy) is reused by every chunk; the caller's logits are never
  modified (the temperature divides the workspace copy).
* backward (custom ``autograd.Function``): saves only a reference to the input logits (no copy),
  the labels and one fp32 value per row (the logsumexp, plus the entropy for
  :func:`entropy_from_logits`). It recomputes the softmax chunk by chunk and writes the gradient
  into a single ``[..., V]`` tensor of the logits' dtype, which is the unavoidable size of a
  gradient w.r.t. the logits. No ``[N, V]`` activations are kept between forward and backward.

:func:`log_probs_from_hidden` goes one step further and starts from the last hidden states
``[N, H]`` and the output layer ``weight [V, H]`` (+ ``bias``): each chunk's logits are computed,
used and dropped, in forward and again in backward, so no ``[N, V]`` tensor exists at all, not even
the gradient w.r.t. the logits (backward produces ``grad_hidden [N, H]`` and ``grad_weight [V, H]``
directly). The price is one extra ``[N, H] x [H, V]`` matmul (the recomputation in backward).

Both paths share the per-chunk math (:func:`_chunk_stats`, :func:`_chunk_grad_`).

Double backward is not supported.
"""

from __future__ import annotations

import torch

__all__ = ["log_probs_from_logits", "entropy_from_logits", "log_probs_from_hidden"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_blocks(x: torch.Tensor) -> list[torch.Tensor]:
    """Split ``x [..., V]`` into 2-D views ``[n_i, V]`` covering all rows in row-major order.

    A tensor whose leading dims can be flattened without a copy gives one block; otherwise
    (e.g. ``logits[:, :-1]`` of a ``[B, L, V]`` tensor) recurse over the first dim, so no full
    copy is ever made.
    """
    if x.dim() == 1:
        return [x.unsqueeze(0)]
    try:
        return [x.view(-1, x.shape[-1])]
    except RuntimeError:
        blocks: list[torch.Tensor] = []
        for i in range(x.shape[0]):
            blocks.extend(_row_blocks(x[i]))
        return blocks


def _chunks(logits: torch.Tensor, chunk_size: int):
    """Yield ``(offset, chunk_view [n, V])`` over all rows of ``logits``, ``n <= chunk_size``."""
    offset = 0
    for block in _row_blocks(logits):
        for s in range(0, block.shape[0], chunk_size):
            c = block[s : s + chunk_size]
            yield offset, c
            offset += c.shape[0]


def _workspace(logits: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """One ``[min(chunk_size, rows), V]`` buffer in the compute dtype, reused by every chunk.

    Reusing it (instead of allocating per chunk) keeps the temporaries at one chunk and, on the
    CPU, avoids re-faulting freshly mapped pages for every chunk.
    """
    rows = logits.numel() // max(logits.shape[-1], 1)
    return torch.empty(
        (max(1, min(chunk_size, rows)), logits.shape[-1]),
        dtype=_compute_dtype(logits.dtype),
        device=logits.device,
    )


def _load_scaled(buf: torch.Tensor, chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """``buf[:n] = chunk.float() / t`` (upcast and scale into the workspace; input untouched)."""
    z = buf[: chunk.shape[0]]
    z.copy_(chunk)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _check(logits: torch.Tensor, temperature: float, chunk_size: int) -> None:
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _n_rows(logits: torch.Tensor) -> int:
    n = 1
    for d in logits.shape[:-1]:
        n *= d
    return n


# ------------------------------------------------------------------ per-chunk math (one home)
# Both paths (from logits, from hidden states) turn a chunk of rows into scaled fp32 logits
# ``z = logits / t`` in a workspace and then call these two helpers.


def _chunk_stats(
    z: torch.Tensor, labels: torch.Tensor | None, with_entropy: bool, pbuf: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Forward statistics of one chunk of scaled logits ``z [n, V]`` (fp32, overwritten).

    Returns ``(log_p_label [n] or None, lse [n], entropy [n] or None)`` with
    ``lse = logsumexp_j z_j``, ``log_p_label = z_y - lse`` (when ``labels [n]`` is given) and
    ``H = lse - sum_j p_j z_j``, ``p = softmax(z)`` (when ``with_entropy``; ``pbuf`` is a second
    workspace of at least ``n`` rows then).
    """
    picked = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) if labels is not None else None
    m = z.amax(-1, keepdim=True)
    if not with_entropy:
        # logsumexp in place: m + log(sum(exp(z - m)))
        lse = z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
        return (None if picked is None else picked - lse), lse, None
    e = torch.sub(z, m, out=pbuf[: z.shape[0]]).exp_()
    s = e.sum(-1, keepdim=True)
    lse = (s.log() + m).squeeze(-1)
    ent = lse - e.mul_(z).sum(-1) / s.squeeze(-1)
    return (None if picked is None else picked - lse), lse, ent


def _chunk_grad_(
    z: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
    g_lp: torch.Tensor | None = None,
    ent: torch.Tensor | None = None,
    g_ent: torch.Tensor | None = None,
    pbuf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. the *unscaled* logits of one chunk, written into ``z [n, V]`` and returned.

    ``z`` holds the scaled fp32 logits ``logits / t``; ``lse [n]`` their logsumexp. With
    ``p = softmax(z)``, ``log p = z - lse``:

    * log-prob of label ``y`` (``labels [n]``, upstream ``g_lp [n]``):
      ``d log p_y / d z_j = onehot_j(y) - p_j``
    * entropy (``ent [n]`` from forward, upstream ``g_ent [n]``; needs ``pbuf``):
      ``dH / d z_j = -p_j (log p_j + H)``

    and ``d z / d logits = 1 / t``. Either term may be absent (``g_lp`` / ``g_ent`` None).
    """
    n = z.shape[0]
    logp = z.sub_(lse.unsqueeze(-1))
    if g_ent is None:
        g = g_lp.to(z.dtype).unsqueeze(-1)
        out = logp.exp_().mul_(-g).scatter_add_(-1, labels.unsqueeze(-1), g)  # g (onehot - p)
    else:
        p = torch.exp(logp, out=pbuf[:n])
        out = logp.add_(ent.unsqueeze(-1)).mul_(p).mul_(-g_ent.to(z.dtype).unsqueeze(-1))
        if g_lp is not None:
            g = g_lp.to(z.dtype).unsqueeze(-1)
            out.sub_(p.mul_(g)).scatter_add_(-1, labels.unsqueeze(-1), g)
    if temperature != 1.0:
        out.div_(temperature)
    return out


# ------------------------------------------------------------------ from logits
class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk_size):
        cdt = _compute_dtype(logits.dtype)
        n_rows = _n_rows(logits)
        flat_labels = labels.reshape(-1)
        out = torch.empty(n_rows, dtype=cdt, device=logits.device)
        lse = torch.empty(n_rows, dtype=cdt, device=logits.device)
        with torch.no_grad():
            buf = _workspace(logits, chunk_size)
            for off, c in _chunks(logits, chunk_size):
                n = c.shape[0]
                z = _load_scaled(buf, c, temperature)
                lp, l, _ = _chunk_stats(z, flat_labels[off : off + n], False, None)
                lse[off : off + n] = l
                out[off : off + n] = lp
            del buf
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, grad.shape[-1])
        g_flat = grad_out.reshape(-1)
        flat_labels = labels.reshape(-1)
        buf = _workspace(logits, cs)
        for off, c in _chunks(logits, cs):
            n = c.shape[0]
            sl = slice(off, off + n)
            z = _load_scaled(buf, c, t)
            grad2d[sl].copy_(_chunk_grad_(z, lse[sl], t, labels=flat_labels[sl], g_lp=g_flat[sl]))
        return grad, None, None, None


class _ChunkedEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, chunk_size):
        cdt = _compute_dtype(logits.dtype)
        n_rows = _n_rows(logits)
        out = torch.empty(n_rows, dtype=cdt, device=logits.device)
        lse = torch.empty(n_rows, dtype=cdt, device=logits.device)
        with torch.no_grad():
            zbuf, pbuf = _workspace(logits, chunk_size), _workspace(logits, chunk_size)
            for off, c in _chunks(logits, chunk_size):
                n = c.shape[0]
                z = _load_scaled(zbuf, c, temperature)
                _, l, e = _chunk_stats(z, None, True, pbuf)
                out[off : off + n] = e
                lse[off : off + n] = l
            del zbuf, pbuf
        ctx.save_for_backward(logits, lse, out)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out.view(logits.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, lse, ent = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, grad.shape[-1])
        g_flat = grad_out.reshape(-1)
        lbuf, pbuf = _workspace(logits, cs), _workspace(logits, cs)
        for off, c in _chunks(logits, cs):
            n = c.shape[0]
            sl = slice(off, off + n)
            z = _load_scaled(lbuf, c, t)
            grad2d[sl].copy_(_chunk_grad_(z, lse[sl], t, ent=ent[sl], g_ent=g_flat[sl], pbuf=pbuf))
        return grad, None, None


# ------------------------------------------------------------------ from hidden states
def _head_chunk(
    buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``buf[:n] = (h @ weight.T + bias).float() / t`` for one chunk ``h [n, H]``.

    The matmul runs in the weight's dtype (as the model's own output layer would), straight into
    the fp32 workspace when that dtype is fp32, else through one ``[n, V]`` temporary.
    """
    z = buf[: h.shape[0]]
    if z.dtype == weight.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=z)
        else:
            torch.addmm(bias, h, weight.t(), out=z)
    else:
        z.copy_(torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t()))
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _HiddenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, with_entropy):
        n_rows, v = hidden.shape[0], weight.shape[0]
        cdt = _compute_dtype(weight.dtype)
        dev = hidden.device
        out = torch.empty(n_rows, dtype=cdt, device=dev)
        lse = torch.empty(n_rows, dtype=cdt, device=dev)
        ent = torch.empty(n_rows if with_entropy else 0, dtype=cdt, device=dev)
        rows = max(1, min(chunk_size, n_rows))
        with torch.no_grad():
            zbuf = torch.empty(rows, v, dtype=cdt, device=dev)
            pbuf = torch.empty(rows, v, dtype=cdt, device=dev) if with_entropy else None
            for s in range(0, n_rows, chunk_size):
                sl = slice(s, min(s + chunk_size, n_rows))
                z = _head_chunk(zbuf, hidden[sl], weight, bias, temperature)
                lp, l, e = _chunk_stats(z, labels[sl], with_entropy, pbuf)
                out[sl], lse[sl] = lp, l
                if with_entropy:
                    ent[sl] = e
            del zbuf, pbuf
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return out, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        t, cs, with_entropy = ctx.temperature, ctx.chunk_size, ctx.with_entropy
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows, v = hidden.shape[0], weight.shape[0]
        cdt = _compute_dtype(weight.dtype)
        dev = hidden.device
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(v, dtype=cdt, device=dev) if need_b and bias is not None else None
        if not (need_h or need_w or grad_b is not None) or n_rows == 0:
            return grad_h, grad_w, grad_b, None, None, None, None
        rows = max(1, min(cs, n_rows))
        zbuf = torch.empty(rows, v, dtype=cdt, device=dev)
        use_ent = with_entropy and g_ent is not None
        pbuf = torch.empty(rows, v, dtype=cdt, device=dev) if use_ent else None
        for s in range(0, n_rows, cs):
            sl = slice(s, min(s + cs, n_rows))
            h = hidden[sl]
            z = _head_chunk(zbuf, h, weight, bias, t)
            gz = _chunk_grad_(
                z, lse[sl], t,
                labels=labels[sl], g_lp=None if g_lp is None else g_lp[sl],
                ent=ent[sl] if use_ent else None, g_ent=g_ent[sl] if use_ent else None, pbuf=pbuf,
            )  # fp32 [n, V]: dL / d logits
            if grad_b is not None:
                grad_b += gz.sum(0)
            gz = gz.to(weight.dtype)
            if need_h:
                torch.mm(gz, weight, out=grad_h[sl]) if grad_h.dtype == gz.dtype else grad_h[sl].copy_(gz @ weight)
            if need_w:
                grad_w.addmm_(gz.t(), h.to(weight.dtype))
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def log_probs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[labels]``, exact and memory-bounded.

    Args:
        logits: ``[..., V]`` fp32 / bf16 / fp16 (fp64 is computed in fp64). Not modified.
        labels: ``[...]`` integer ids in ``[0, V)``, same leading shape as ``logits``.
        temperature: > 0; logits are divided by it before the log-softmax (per chunk, on a copy).
        chunk_size: rows per chunk; at most one chunk of ``[chunk_size, V]`` fp32 temporaries
            exists at a time. The leading dims are flattened into rows without copying (a
            non-contiguous ``logits[:, :-1]`` is walked row block by row block).

    Returns:
        ``[...]`` float32 (float64 for fp64 logits). Matches
        ``log_softmax(logits.float() / t, -1).gather(-1, labels[..., None])[..., 0]`` to ~1e-6.

    Differentiable w.r.t. ``logits``. Backward memory: a reference to ``logits`` (no copy),
    ``labels`` and one fp32 logsumexp per row are kept from forward; backward allocates the
    gradient ``[..., V]`` in the logits' dtype plus one chunk of fp32 temporaries.
    """
    _check(logits, temperature, chunk_size)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    labels = labels.to(device=logits.device, dtype=torch.long)
    return _ChunkedLogProbs.apply(logits, labels, float(temperature), int(chunk_size))


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim: ``[..., V]`` -> ``[...]``.

    Same chunking, dtype and memory behaviour as :func:`log_probs_from_logits`; backward keeps a
    reference to ``logits`` plus two fp32 values per row (logsumexp and entropy).
    """
    _check(logits, temperature, chunk_size)
    return _ChunkedEntropy.apply(logits, float(temperature), int(chunk_size))


def log_probs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Label log-probs (and entropies) of ``softmax((hidden @ weight.T + bias) / temperature)``
    without ever materialising the ``[N, V]`` logits, in forward or backward.

    Args:
        hidden: ``[N, H]`` last hidden states (any float dtype; kept by reference for backward,
            made contiguous first).
        weight: ``[V, H]`` output layer weight (a tied input embedding is fine: its gradient is
            accumulated like any other use). The matmul runs in ``weight.dtype``; ``hidden`` is
            cast to it.
        bias: ``[V]`` or None.
        labels: ``[N]`` integer ids in ``[0, V)``.
        temperature: > 0; the logits are divided by it (in fp32, after the matmul).
        chunk_size: rows per chunk; one ``[chunk_size, V]`` fp32 workspace (two with the entropy)
            plus, for a non-fp32 weight, one ``[chunk_size, V]`` matmul output exist at a time.
        with_entropy: also return the entropy of each row's distribution.

    Returns:
        ``(log_probs [N], entropy [N] or None)``, float32 (float64 for an fp64 weight), with
        ``log_probs[i] = z_i[labels[i]] - logsumexp(z_i)``, ``entropy[i] = -sum_j p_ij log p_ij``,
        ``z_i = (hidden[i] @ weight.T + bias).float() / t``, ``p_i = softmax(z_i)``.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``. Forward keeps references to its
    inputs, the labels and one (two with the entropy) fp32 value per row; backward recomputes each
    chunk's logits and softmax, forms ``dL/dlogits`` for the chunk (see :func:`_chunk_grad_`) and
    accumulates ``grad_hidden[chunk] = dL/dlogits @ weight``, ``grad_weight += dL/dlogits.T @
    hidden[chunk]`` (in ``weight.dtype``, one rounding per chunk for bf16) and
    ``grad_bias += dL/dlogits.sum(0)``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if not weight.dtype.is_floating_point or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} / {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.to(weight.dtype).contiguous()
    labels = labels.to(device=hidden.device, dtype=torch.long)
    lp, ent = _HiddenLogProbs.apply(
        hidden, weight, bias, labels, float(temperature), int(chunk_size), bool(with_entropy)
    )
    return lp, (ent if with_entropy else None)
