"""Log-probs / entropy from hidden states through the output layer (`log_probs_from_hidden`) and
the Actor's `logprobs_from_hidden` option (tiny Llama, CPU)."""

import pytest
import torch
import torch.nn as nn

from learner.models import actor as actor_mod
from learner.models.actor import Actor, LoraSpec
from learner.models.logprobs import log_probs_from_hidden

from .test_models import LENS, V, pack, pad, tiny_config


# ----------------------------------------------------------------------------- the function
def _naive(hidden, weight, bias, labels, t):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.float() / t, -1)
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _inputs(dtype, n=37, h=24, v=101, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 2).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    w_lp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return hidden, weight, b, labels, w_lp, w_ent


def _grads(fn, hidden, weight, bias, labels, w_lp, w_ent, with_entropy):
    params = [p for p in (hidden, weight, bias) if p is not None]
    for p in params:
        p.grad = None
    lp, ent = fn()
    loss = (lp * w_lp).sum() + ((ent * w_ent).sum() if with_entropy else 0)
    loss.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.15)])
@pytest.mark.parametrize("chunk", [5, 37, 4096])  # 5 does not divide 37
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_hidden_equals_naive_values_and_gradients(dtype, atol, chunk, with_entropy, bias):
    hidden, weight, b, labels, w_lp, w_ent = _inputs(dtype, bias=bias)
    t = 0.7
    got = _grads(lambda: log_probs_from_hidden(hidden, weight, b, labels, t, chunk, with_entropy),
                 hidden, weight, b, labels, w_lp, w_ent, with_entropy)
    ref = _grads(lambda: _naive(hidden, weight, b, labels, t), hidden, weight, b, labels, w_lp, w_ent,
                 with_entropy)
    assert got[0].dtype == torch.float32
    close = lambda a, r: torch.testing.assert_close(a.float(), r.float(), atol=atol, rtol=atol)  # noqa: E731
    close(got[0], ref[0])
    if with_entropy:
        close(got[1], ref[1])
    else:
        assert got[1] is None
    for g, r in zip(got[2], ref[2]):  # sums over rows (grad_weight, grad_bias): tolerance relative to scale
        assert g.dtype == dtype
        scale = max(1.0, r.float().abs().max().item())
        torch.testing.assert_close(g.float(), r.float(), atol=atol * scale, rtol=atol)


def test_hidden_gradcheck_fp64():
    """Analytic gradients (hidden, weight, bias; log-prob and entropy) against finite differences."""
    hidden, weight, b, labels, *_ = _inputs(torch.float64, n=6, h=5, v=11)
    assert log_probs_from_hidden(hidden, weight, b, labels)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda h, w, bb: log_probs_from_hidden(h, w, bb, labels, 1.3, 4, True), (hidden, weight, b)
    )


def test_hidden_frozen_weight_only_hidden_gets_a_gradient():
    hidden, weight, _, labels, w_lp, _ = _inputs(torch.float32, bias=False)
    weight.requires_grad_(False)
    lp, _ = log_probs_from_hidden(hidden, weight, None, labels, 1.0, 8)
    (lp * w_lp).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_hidden_input_errors():
    hidden, weight, b, labels, *_ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        log_probs_from_hidden(hidden[None], weight, b, labels)
    with pytest.raises(ValueError, match="labels"):
        log_probs_from_hidden(hidden, weight, b, labels[:-1])
    with pytest.raises(ValueError, match="temperature"):
        log_probs_from_hidden(hidden, weight, b, labels, 0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        log_probs_from_hidden(hidden, weight, b, labels, 1.0, 0)


# ------------------------------------------------------------------------------ the Actor
def _lm(seed=0, **cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(**cfg), attn_implementation="sdpa", dtype=torch.float32)


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(321)
    return [torch.randint(0, V, (n,), generator=g) for n in LENS]


def _run(a, call, weights):
    """Outputs and parameter gradients of ``sum(w_lp * log_probs + w_ent * entropy)``."""
    a.zero_grad()
    out = call(a)
    loss = (out["log_probs"] * weights[0]).sum() + (out["entropy"] * weights[1]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in a.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _on_equals_off(a, call, shape):
    g = torch.Generator().manual_seed(0)
    weights = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    a.logprobs_from_hidden = False
    off, g_off = _run(a, call, weights)
    a.logprobs_from_hidden = True
    assert not isinstance(a.hidden_path(), str)
    on, g_on = _run(a, call, weights)
    for k in ("log_probs", "entropy"):
        torch.testing.assert_close(on[k], off[k], atol=1e-5, rtol=1e-5)
    assert g_on.keys() == g_off.keys() and len(g_on) > 0
    for n in g_on:
        torch.testing.assert_close(g_on[n], g_off[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("tied", [False, True])
def test_actor_hidden_equals_logits_packed_and_padded(seqs, tied):
    a = Actor(_lm(tie_word_embeddings=tied), logprobs_chunk_size=4)
    a.hidden_chunk_rows = 4  # chunks smaller than a sequence
    a.train()
    if tied:
        assert a.model.get_output_embeddings().weight is a.model.get_input_embeddings().weight
    tokens, cu = pack(seqs)
    _on_equals_off(a, lambda m: m(tokens, cu_seqlens=cu, temperature=0.8, return_entropy=True), tokens.shape)
    for side in ("right", "left"):
        ids, mask = pad(seqs, side)
        _on_equals_off(a, lambda m: m(ids, attention_mask=mask, temperature=0.8, return_entropy=True), ids.shape)


def test_actor_hidden_equals_logits_varlen_path(seqs, monkeypatch):
    """The packed one-forward path (flash-attention's in production): on CPU, one sequence with
    sdpa and no mask is the same computation."""
    orig = actor_mod.packed_model_kwargs
    monkeypatch.setattr(actor_mod, "packed_model_kwargs", lambda t, cu, impl: orig(t, cu, "flash_attention_2"))
    a = Actor(_lm(), logprobs_chunk_size=3)
    a.hidden_chunk_rows = 3
    s = seqs[2]
    cu = torch.tensor([0, len(s)], dtype=torch.int32)
    _on_equals_off(a, lambda m: m._varlen_forward(s, cu, 1.3, True), s.shape)


def test_actor_hidden_with_lora_not_on_the_head(seqs):
    a = Actor(_lm(), lora=LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    tokens, cu = pack(seqs)
    _on_equals_off(a, lambda m: m(tokens, cu_seqlens=cu, return_entropy=True), tokens.shape)


def test_actor_falls_back_to_the_logits_when_the_head_is_not_plain(seqs):
    a = Actor(_lm(), lora=LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "lm_head"]),
              logprobs_from_hidden=True)
    assert "nn.Linear" in a.hidden_path()
    tokens, cu = pack(seqs)
    out = a(tokens, cu_seqlens=cu)  # runs, through the logits
    a.logprobs_from_hidden = False
    torch.testing.assert_close(out["log_probs"], a(tokens, cu_seqlens=cu)["log_probs"], atol=0, rtol=0)

    b = Actor(_lm(final_logit_softcapping=30.0), logprobs_from_hidden=True)
    assert "final_logit_softcapping" in b.hidden_path()
    c = Actor(_lm(), logprobs_from_hidden=True)
    c.model.lm_head = nn.Sequential(c.model.lm_head)
    assert isinstance(c.hidden_path(), str)


def test_option_in_config():
    from protocol.config import ModelConfig

    assert ModelConfig().logprobs_from_hidden is True  # exact and not slower on the task models (README)


def test_actor_hidden_close_to_logits_in_bf16(seqs):
    a = Actor(_lm().to(torch.bfloat16))
    a.hidden_chunk_rows = 4
    tokens, cu = pack(seqs)
    outs = []
    for on in (False, True):
        a.logprobs_from_hidden = on
        a.zero_grad()
        out = a(tokens, cu_seqlens=cu, return_entropy=True)
        (out["log_probs"].sum() + out["entropy"].sum()).backward()
        outs.append((out["log_probs"].detach(), out["entropy"].detach(), a.model.lm_head.weight.grad.float()))
    (lp0, e0, g0), (lp1, e1, g1) = outs
    assert lp1.dtype == torch.float32
    torch.testing.assert_close(lp1, lp0, atol=2e-2, rtol=0)
    torch.testing.assert_close(e1, e0, atol=2e-2, rtol=0)
    torch.testing.assert_close(g1, g0, atol=2e-2 * g0.abs().max().item(), rtol=2e-2)
