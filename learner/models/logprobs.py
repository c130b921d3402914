"""Memory-bounded log-probabilities and entropies from logits.

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

Double backward is not supported.
"""

from __future__ import annotations

import torch

__all__ = ["log_probs_from_logits", "entropy_from_logits"]


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
                picked = z.gather(-1, flat_labels[off : off + n].unsqueeze(-1)).squeeze(-1)
                m = z.amax(-1, keepdim=True)
                # logsumexp in place: m + log(sum(exp(z - m)))
                l = z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
                lse[off : off + n] = l
                out[off : off + n] = picked - l
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
        # d/dz_j [z_y - lse(z)] = onehot_j(y) - softmax_j(z);  z = logits / t
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, grad.shape[-1])
        g_flat = grad_out.reshape(-1)
        flat_labels = labels.reshape(-1)
        buf = _workspace(logits, cs)
        for off, c in _chunks(logits, cs):
            n = c.shape[0]
            p = _load_scaled(buf, c, t).sub_(lse[off : off + n].unsqueeze(-1)).exp_()  # softmax
            g = g_flat[off : off + n].to(p.dtype).unsqueeze(-1)
            p.mul_(-g).scatter_add_(-1, flat_labels[off : off + n].unsqueeze(-1), g)
            if t != 1.0:
                p.div_(t)
            grad2d[off : off + n].copy_(p)
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
                m = z.amax(-1, keepdim=True)
                e = torch.sub(z, m, out=pbuf[:n]).exp_()
                s = e.sum(-1, keepdim=True)
                l = (s.log() + m).squeeze(-1)
                # H = lse - sum_j p_j z_j,  p = e / s
                out[off : off + n] = l - e.mul_(z).sum(-1) / s.squeeze(-1)
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
        # dH/dz_j = -p_j (log p_j + H);  z = logits / t
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad2d = grad.view(-1, grad.shape[-1])
        g_flat = grad_out.reshape(-1)
        lbuf, pbuf = _workspace(logits, cs), _workspace(logits, cs)
        for off, c in _chunks(logits, cs):
            n = c.shape[0]
            logp = _load_scaled(lbuf, c, t).sub_(lse[off : off + n].unsqueeze(-1))
            p = torch.exp(logp, out=pbuf[:n])
            logp.add_(ent[off : off + n].unsqueeze(-1)).mul_(p)
            logp.mul_(-g_flat[off : off + n].to(logp.dtype).unsqueeze(-1))
            if t != 1.0:
                logp.div_(t)
            grad2d[off : off + n].copy_(logp)
        return grad, None, None


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
