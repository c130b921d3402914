"""Packing helpers and memory-bounded log-probs / entropy (no model needed)."""

import pytest
import torch

from learner.models.logprobs import entropy_from_logits, log_probs_from_logits
from learner.models.packing import (
    forward_in_length_buckets,
    length_buckets,
    padded_rows,
    packed_model_kwargs,
    padded_action_mask,
    padded_position_ids,
    position_ids_from_cu_seqlens,
    sequence_start_mask,
    unpack_to_padded,
    validate_cu_seqlens,
)

CU = torch.tensor([0, 2, 5], dtype=torch.int32)  # a 2 + 3 token pack


# ---------------------------------------------------------------------------------- packing
def test_positions_and_starts():
    assert position_ids_from_cu_seqlens(CU).tolist() == [[0, 1, 0, 1, 2]]
    cu = torch.tensor([0, 1, 4, 6], dtype=torch.int32)
    assert position_ids_from_cu_seqlens(cu).tolist() == [[0, 0, 1, 2, 0, 1]]
    assert sequence_start_mask(cu).tolist() == [True, True, False, False, True, False]


def test_packed_model_kwargs():
    tokens = torch.arange(5)
    kw = packed_model_kwargs(tokens[None], CU, "flash_attention_2")
    assert kw["input_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert kw["attention_mask"] is None and kw["position_ids"].tolist() == [[0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="forward_in_length_buckets"):
        packed_model_kwargs(tokens, CU, "sdpa")
    with pytest.raises(ValueError, match="does not match"):
        packed_model_kwargs(torch.arange(6), CU, "flash_attention_2")
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        packed_model_kwargs(torch.arange(10).view(2, 5), CU, "flash_attention_2")


@pytest.mark.parametrize(
    "cu, msg",
    [
        (torch.tensor([1, 3, 5]), "start at 0"),
        (torch.tensor([0, 3, 2]), "strictly increasing"),
        (torch.tensor([0, 3, 3]), "strictly increasing"),
        (torch.tensor([0]), "at least 2"),
        (torch.tensor([[0, 2]]), "1-D"),
        (torch.tensor([0.0, 2.0]), "integer"),
    ],
)
def test_validate_cu_seqlens(cu, msg):
    with pytest.raises(ValueError, match=msg):
        validate_cu_seqlens(cu)


def test_unpack_to_padded():
    cu = torch.tensor([0, 4, 7, 12], dtype=torch.int32)
    prompt_lens = torch.tensor([2, 1, 2])
    flat = torch.arange(1, 13, dtype=torch.float32)  # token i has value i + 1
    padded, mask = unpack_to_padded(flat, cu, prompt_lens)
    assert padded.tolist() == [[3, 4, 0], [6, 7, 0], [10, 11, 12]]
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]
    cu2 = torch.tensor([0, 5, 7], dtype=torch.int32)
    p2, m2 = unpack_to_padded(torch.arange(7.0), cu2, torch.tensor([1, 1]))
    assert p2.tolist() == [[1, 2, 3, 4], [6, 0, 0, 0]]
    assert m2.tolist() == [[True] * 4, [True, False, False, False]]
    # trailing feature dims
    f = torch.randn(7, 3)
    pf, _ = unpack_to_padded(f, cu2, torch.tensor([2, 1]))
    assert pf.shape == (2, 3, 3) and torch.equal(pf[0], f[2:5])


def test_unpack_to_padded_differentiable():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    pl = torch.tensor([1, 3])
    flat = torch.randn(9, requires_grad=True)
    padded, mask = unpack_to_padded(flat, cu, pl)
    w = torch.randn_like(padded)
    (padded * w).sum().backward()
    # actions: tokens 1-3 (row 0, columns 0-2) and 7-8 (row 1, columns 0-1); prompts get no gradient
    expected = torch.zeros(9)
    expected[[1, 2, 3]], expected[[7, 8]] = w[0, :3], w[1, :2]
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(flat.grad, expected)


def test_unpack_validation():
    flat = torch.zeros(5)
    with pytest.raises(ValueError, match="shorter than its sequence"):
        unpack_to_padded(flat, CU, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match=">= 1"):
        unpack_to_padded(flat, CU, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        unpack_to_padded(flat, CU, torch.tensor([1]))
    with pytest.raises(ValueError, match="does not match"):
        unpack_to_padded(torch.zeros(6), CU, torch.tensor([1, 1]))


def test_padded_helpers():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert padded_position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert padded_action_mask(mask).tolist() == [
        [False, False, False, True, True],
        [False, True, True, False, False],
    ]


def test_length_buckets_bound_the_padding():
    # sorted 10, 9, 4, 3: [10, 9] pads 1 of 20; adding 4 would pad 30 > 1.25 * 23; [4, 3] pads 1 of 8
    groups = length_buckets(torch.tensor([3, 10, 4, 9]))
    assert [g.tolist() for g in groups] == [[1, 3], [2, 0]]
    assert [g.tolist() for g in length_buckets(torch.tensor([5] * 7))] == [list(range(7))]  # equal: one group
    lens = torch.randint(1, 400, (200,), generator=torch.Generator().manual_seed(0))
    groups = length_buckets(lens)
    assert sorted(torch.cat(groups).tolist()) == list(range(200))
    for g in groups:
        assert len(g) * int(lens[g].max()) <= 1.25 * int(lens[g].sum()) or len(g) == 1


def test_padded_rows_and_back():
    tokens, cu = torch.arange(10, 19), torch.tensor([0, 2, 5, 9])  # lengths 2, 3, 4
    ids, mask, index = padded_rows(tokens, cu, torch.tensor([2, 0]))
    assert ids.tolist() == [[15, 16, 17, 18], [10, 11, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert index.tolist() == [[5, 6, 7, 8], [0, 1, 0, 0]]
    # every sequence comes back to its packed place, whatever the grouping
    out = forward_in_length_buckets(tokens, cu, lambda ids, mask: {"x": ids * 2, "y": ids[..., None].repeat(1, 1, 3)})
    assert out["x"].tolist() == (tokens * 2).tolist() and out["y"].shape == (9, 3)
    calls = []
    one = forward_in_length_buckets(tokens, cu, lambda ids, mask: calls.append(ids.shape) or {"x": ids}, None)
    assert calls == [(3, 4)] and one["x"].tolist() == tokens.tolist()  # ZeRO-3: one forward, padded to the longest


# ---------------------------------------------------------------------------------- log-probs
def _naive_lp(logits, labels, t=1.0):
    return torch.log_softmax(logits.float() / t, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _naive_ent(logits, t=1.0):
    lp = torch.log_softmax(logits.float() / t, -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("t", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_log_probs_match_naive_fp32(t, chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 97, generator=g) * 4
    labels = torch.randint(0, 97, (2, 9), generator=g)
    before = logits.clone()
    got = log_probs_from_logits(logits, labels, temperature=t, chunk_size=chunk)
    assert got.dtype == torch.float32 and got.shape == (2, 9)
    torch.testing.assert_close(got, _naive_lp(logits, labels, t), atol=1e-5, rtol=0)
    assert torch.equal(logits, before)  # temperature does not touch the caller's tensor
    ent = entropy_from_logits(logits, temperature=t, chunk_size=chunk)
    torch.testing.assert_close(ent, _naive_ent(logits, t), atol=1e-5, rtol=0)
    # non-contiguous slice (as used for logits[:, :-1]) and 1-D input
    got = log_probs_from_logits(logits[:, :-1], labels[:, 1:], temperature=t, chunk_size=chunk)
    torch.testing.assert_close(got, _naive_lp(logits[:, :-1], labels[:, 1:], t), atol=1e-5, rtol=0)
    got1 = log_probs_from_logits(logits[0, 0], labels[0, 0], temperature=t, chunk_size=chunk)
    assert got1.shape == () and abs(got1.item() - _naive_lp(logits[0, 0], labels[0, 0], t).item()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_probs_half_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(17, 300, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 300, (17,), generator=g)
    got = log_probs_from_logits(logits, labels, temperature=0.9, chunk_size=5)
    assert got.dtype == torch.float32 and logits.dtype == dtype
    # same math on the upcast values: tight; against an all-half naive: loose
    torch.testing.assert_close(got, _naive_lp(logits, labels, 0.9), atol=1e-5, rtol=0)
    half_naive = torch.log_softmax(logits / 0.9, -1).gather(-1, labels[:, None])[:, 0].float()
    torch.testing.assert_close(got, half_naive, atol=5e-2, rtol=2e-2)
    ent = entropy_from_logits(logits, temperature=0.9, chunk_size=5)
    torch.testing.assert_close(ent, _naive_ent(logits, 0.9), atol=1e-4, rtol=0)


@pytest.mark.parametrize("t", [1.0, 0.6])
@pytest.mark.parametrize("sliced", [False, True])
def test_gradients_match_naive(t, sliced):
    g = torch.Generator().manual_seed(2)
    base = (torch.randn(3, 8, 61, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, 61, (3, 8), generator=g)
    x, lab = (base[:, :-1], labels[:, 1:]) if sliced else (base, labels)
    w1 = torch.randn(lab.shape, generator=g)
    w2 = torch.randn(lab.shape, generator=g)

    def loss(lp, ent):
        return (lp * w1).sum() + (ent * w2).sum()

    (g_chunk,) = torch.autograd.grad(
        loss(log_probs_from_logits(x, lab, t, chunk_size=4), entropy_from_logits(x, t, chunk_size=5)), base
    )
    (g_naive,) = torch.autograd.grad(loss(_naive_lp(x, lab, t), _naive_ent(x, t)), base)
    torch.testing.assert_close(g_chunk, g_naive, atol=1e-5, rtol=1e-5)


def test_gradients_bf16():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 50, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (10,), generator=g)
    w = torch.randn(10, generator=g)
    (gc,) = torch.autograd.grad((log_probs_from_logits(x, labels, 0.8, chunk_size=3) * w).sum(), x)
    (gn,) = torch.autograd.grad((_naive_lp(x, labels, 0.8) * w).sum(), x)
    assert gc.dtype == torch.bfloat16
    torch.testing.assert_close(gc.float(), gn.float(), atol=1e-2, rtol=1e-2)


def test_log_probs_argument_errors():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="labels shape"):
        log_probs_from_logits(logits, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        log_probs_from_logits(logits, torch.zeros(4, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)
