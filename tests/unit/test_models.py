"""Actor / Critic / Reward on a tiny Llama built from a config (CPU, fp32, sdpa)."""

import contextlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from learner.models import (
    Actor,
    CriticModel,
    LoraSpec,
    RewardModel,
    build_value_model,
)

V = 64
ATOL = 1e-5
LENS = (5, 3, 7)


def tiny_config(**kw):
    return LlamaConfig(
        vocab_size=V,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        num_hidden_layers=2,
        **kw,
    )


def tiny_lm(impl="sdpa", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(), attn_implementation=impl, dtype=torch.float32)


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, V, (n,), generator=g) for n in LENS]


def pack(seqs):
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    return torch.cat(seqs), cu


def pad(seqs, side):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), 7, dtype=torch.long)  # pad id is a real token on purpose
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s)
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ actor
@pytest.fixture(scope="module")
def actor():
    return Actor(tiny_lm()).eval()


def test_actor_alignment_and_temperature(actor, seqs):
    s = seqs[2]
    t = 0.7
    with torch.no_grad():
        out = actor(s[None], temperature=t, return_entropy=True)
        logits = actor.model(input_ids=s[None]).logits[0].float()
    logp = torch.log_softmax(logits / t, -1)
    exp_lp = torch.zeros(len(s))
    exp_lp[1:] = logp[:-1].gather(-1, s[1:, None])[:, 0]
    exp_ent = torch.zeros(len(s))
    exp_ent[1:] = -(logp.exp() * logp).sum(-1)[:-1]
    close(out["log_probs"][0], exp_lp)
    close(out["entropy"][0], exp_ent)
    assert out["log_probs"].dtype == torch.float32


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_actor_packed_equals_alone_and_padded(impl, seqs):
    a = Actor(tiny_lm(impl)).eval()
    tokens, cu = pack(seqs)
    with torch.no_grad():
        packed = a(tokens, cu_seqlens=cu, temperature=0.8, return_entropy=True)
        packed2 = a(tokens[None], cu_seqlens=cu, temperature=0.8)
        alone = [a(s[None], temperature=0.8, return_entropy=True) for s in seqs]
    assert packed["log_probs"].shape == (tokens.numel(),)
    ref_lp = torch.cat([o["log_probs"][0] for o in alone])
    ref_ent = torch.cat([o["entropy"][0] for o in alone])
    close(packed["log_probs"], ref_lp)
    close(packed2["log_probs"], ref_lp)
    close(packed["entropy"], ref_ent)
    starts = cu[:-1].long()
    assert (packed["log_probs"][starts] == 0).all() and (packed["entropy"][starts] == 0).all()
    assert (packed["log_probs"][torch.arange(len(tokens)) != 0] != 0).sum() >= len(tokens) - len(seqs)
    for side in ("right", "left"):
        ids, mask = pad(seqs, side)
        with torch.no_grad():
            out = a(ids, attention_mask=mask, temperature=0.8, return_entropy=True)
        assert out["log_probs"].shape == ids.shape
        close(out["log_probs"][mask.bool()], ref_lp)
        close(out["entropy"][mask.bool()], ref_ent)
        assert (out["log_probs"][~mask.bool()] == 0).all() and (out["entropy"][~mask.bool()] == 0).all()


def test_actor_bf16_packed_close_to_alone(seqs):
    a = Actor(tiny_lm().to(torch.bfloat16)).eval()
    tokens, cu = pack(seqs)
    with torch.no_grad():
        packed = a(tokens, cu_seqlens=cu)["log_probs"]
        ref = torch.cat([a(s[None])["log_probs"][0] for s in seqs])
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, ref, atol=5e-2, rtol=0)


def test_actor_packed_gradients_equal_separate(seqs):
    a = Actor(tiny_lm())
    tokens, cu = pack(seqs)
    a.zero_grad()
    a(tokens, cu_seqlens=cu)["log_probs"].sum().backward()
    g_packed = {n: p.grad.clone() for n, p in a.named_parameters()}
    a.zero_grad()
    for s in seqs:
        a(s[None])["log_probs"].sum().backward()
    for n, p in a.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-4)


def test_actor_input_errors(actor, seqs):
    tokens, cu = pack(seqs)
    with pytest.raises(ValueError, match="not both"):
        actor(tokens, attention_mask=torch.ones_like(tokens), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        actor(tokens)


def test_actor_save_load_roundtrip(actor, seqs, tmp_path):
    tokens, cu = pack(seqs)
    actor.save_pretrained(tmp_path / "actor")
    b = Actor.from_pretrained(str(tmp_path / "actor"), dtype="float32", attn_implementation="sdpa").eval()
    assert b.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ra = actor(tokens, cu_seqlens=cu, return_entropy=True)
        rb = b(tokens, cu_seqlens=cu, return_entropy=True)
    assert torch.equal(ra["log_probs"], rb["log_probs"]) and torch.equal(ra["entropy"], rb["entropy"])


def test_actor_lora_trainable_and_merged_save(seqs, tmp_path):
    a = Actor(tiny_lm(), lora=LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for n, p in a.named_parameters():
        if "lora_B" in n:  # B is zero-initialised; make the adapter non-trivial
            torch.nn.init.normal_(p, std=0.2)
    a.eval()
    tokens, cu = pack(seqs)
    with torch.no_grad():
        before = a(tokens, cu_seqlens=cu)["log_probs"]
    a.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    merged = Actor.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        after = merged(tokens, cu_seqlens=cu)["log_probs"]
        again = a(tokens, cu_seqlens=cu)["log_probs"]
    close(after, before)
    assert torch.equal(again, before)  # saving did not modify the live adapter model
    a.save_pretrained(tmp_path / "adapter")  # adapter only
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")


def test_merged_weights_stream_the_state_dict_one_gathered_module_at_a_time():
    a = Actor(tiny_lm())
    reference = a.model.state_dict()
    open_gathers: list[set[str]] = []
    names_of = {id(p): n for n, p in a.model.named_parameters()}

    class RecordingGather:
        def __init__(self, params):
            self.names = {names_of[id(p)] for p in params}

        def __enter__(self):
            open_gathers.append(self.names)

        def __exit__(self, *exc):
            open_gathers.remove(self.names)

    streamed = []
    for name, tensor in a.merged_weights(RecordingGather):
        assert len(open_gathers) <= 1, "only one module is gathered at a time"
        if name in names_of.values():
            assert open_gathers == [{n for n in names_of.values() if n.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]}]
        streamed.append((name, tensor))
    assert [n for n, _ in streamed] == list(reference), "same names, in state-dict order"
    assert all(torch.equal(t, reference[n]) for n, t in streamed)
    assert not open_gathers


def test_merged_weights_of_a_lora_actor_equal_peft_merge_and_unload():
    a = Actor(tiny_lm(), lora=LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for n, p in a.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    gathered_modules = []
    merged = dict(a.merged_weights(lambda params: gathered_modules.append(len(params)) or contextlib.nullcontext()))
    import copy

    reference = copy.deepcopy(a.model).merge_and_unload().state_dict()
    assert list(merged) == list(reference)
    for name in reference:
        close(merged[name], reference[name])
    # a LoRA layer (base weight + A + B) is gathered as one unit
    assert 3 in gathered_modules


def test_actor_lora_gradient_checkpointing_backward(seqs):
    a = Actor(tiny_lm(), lora=LoraSpec(rank=2, alpha=4), gradient_checkpointing=True)
    a.train()
    tokens, cu = pack(seqs)
    a(tokens, cu_seqlens=cu)["log_probs"].sum().backward()
    grads = [p.grad for n, p in a.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    # B is zero so dL/dA == 0; dL/dB must be non-zero
    assert any(p.grad.abs().sum() > 0 for n, p in a.named_parameters() if "lora_B" in n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_4bit_on_cpu_raises_before_loading():
    with pytest.raises(RuntimeError, match="4-bit loading needs a CUDA GPU and bitsandbytes"):
        Actor.from_pretrained("/nonexistent/model/path", load_in_4bit=True)


# ------------------------------------------------------------------------------------ value models
def _randomise_head(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_value_head().weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def critic():
    torch.manual_seed(1)
    return _randomise_head(build_value_model("critic", tiny_config())).eval()


@pytest.fixture(scope="module")
def reward():
    torch.manual_seed(2)
    return _randomise_head(build_value_model("reward", tiny_config(), value_head_prefix="value_head")).eval()


def test_critic_alignment(critic, seqs):
    s = seqs[0]
    with torch.no_grad():
        v = critic(s[None])[0]
        h = critic.base_model(input_ids=s[None]).last_hidden_state[0]
        head = critic.get_value_head()(h).squeeze(-1)
    expected = torch.cat([torch.zeros(1), head[:-1]])
    close(v, expected)


def test_critic_packed_equals_alone_and_padded(critic, seqs):
    tokens, cu = pack(seqs)
    with torch.no_grad():
        packed = critic(tokens, cu_seqlens=cu)
        ref = torch.cat([critic(s[None])[0] for s in seqs])
    assert packed.shape == (tokens.numel(),) and packed.dtype == torch.float32
    close(packed, ref)
    assert (packed[cu[:-1].long()] == 0).all()
    for side in ("right", "left"):
        ids, mask = pad(seqs, side)
        with torch.no_grad():
            out = critic(ids, attention_mask=mask)
        assert out.shape == ids.shape
        close(out[mask.bool()], ref)
        assert (out[~mask.bool()] == 0).all()


def test_reward_packed_equals_alone_and_padded(reward, seqs):
    tokens, cu = pack(seqs)
    with torch.no_grad():
        packed = reward(tokens, cu_seqlens=cu)
        alone = torch.stack([reward(s[None])[0] for s in seqs])
        h = reward.base_model(input_ids=seqs[1][None]).last_hidden_state[0, -1]
        direct = reward.get_value_head()(h)[0]
    assert packed.shape == (len(seqs),)
    close(packed, alone)
    close(alone[1], direct)
    for side in ("right", "left"):
        ids, mask = pad(seqs, side)
        with torch.no_grad():
            close(reward(ids, attention_mask=mask), alone)


def test_reward_normalisation(seqs):
    torch.manual_seed(3)
    rm = _randomise_head(build_value_model("reward", tiny_config(), normalize_reward=True))
    rm.mean.fill_(0.5)
    rm.std.fill_(2.0)
    tokens, cu = pack(seqs)
    rm.train()
    with torch.no_grad():
        raw = rm(tokens, cu_seqlens=cu)
    rm.eval()
    with torch.no_grad():
        normed = rm(tokens, cu_seqlens=cu)
    close(normed, (raw - 0.5) / 2.0)
    rm.normalize_reward = False
    with torch.no_grad():
        close(rm(tokens, cu_seqlens=cu), raw)


@pytest.mark.parametrize("kind", ["critic", "reward"])
def test_value_model_save_load_roundtrip(kind, seqs, tmp_path):
    torch.manual_seed(4)
    m = _randomise_head(
        build_value_model(kind, tiny_config(), value_head_prefix="v_head", normalize_reward=(kind == "reward"))
    )
    m.mean.fill_(0.25)
    m.std.fill_(3.0)
    m.eval()
    assert "v_head.weight" in m.state_dict() and "model.layers.0.mlp.up_proj.weight" in m.state_dict()
    d = tmp_path / kind
    m.save_pretrained(d)
    cfg = json.load(open(d / "config.json"))
    assert cfg["value_model_kind"] == kind and cfg["value_head_prefix"] == "v_head"
    assert cfg["mean"] == 0.25 and cfg["std"] == 3.0 and cfg["normalize_reward"] == (kind == "reward")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert "v_head.weight" in f.keys()
    # the saved prefix wins over the default argument
    m2 = build_value_model(kind, str(d)).eval()
    assert type(m2) is type(m) and m2.value_head_prefix == "v_head"
    assert float(m2.mean) == 0.25 and float(m2.std) == 3.0 and m2.normalize_reward == (kind == "reward")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    tokens, cu = pack(seqs)
    ids, mask = pad(seqs, "left")
    with torch.no_grad():
        assert torch.equal(m(tokens, cu_seqlens=cu), m2(tokens, cu_seqlens=cu))
        assert torch.equal(m(ids, attention_mask=mask), m2(ids, attention_mask=mask))


def test_value_model_from_causal_lm_checkpoint(tmp_path):
    lm = tiny_lm(seed=7)
    lm.save_pretrained(tmp_path / "lm")
    critic = build_value_model("critic", str(tmp_path / "lm"))
    rm = build_value_model("reward", str(tmp_path / "lm"), value_head_prefix="score")
    for m in (critic, rm):
        assert isinstance(m.base_model, torch.nn.Module) and not hasattr(m.base_model, "lm_head")
        for n, p in lm.model.named_parameters():
            assert torch.equal(p, m.base_model.get_parameter(n)), n
    assert isinstance(critic, CriticModel) and isinstance(rm, RewardModel)
    assert (critic.get_value_head().weight == 0).all()  # critic head starts at zero
    w = rm.get_value_head().weight
    assert w.shape == (1, 128) and 0.03 < w.std().item() < 0.15  # normal(0, 1/sqrt(129)) ~ 0.088
    assert rm.normalize_reward is False and float(rm.mean) == 0.0 and float(rm.std) == 1.0


def test_build_value_model_errors():
    with pytest.raises(ValueError, match="unknown value model kind"):
        build_value_model("policy", tiny_config())
    with pytest.raises(ValueError, match="value_head_prefix"):
        build_value_model("critic", tiny_config(), value_head_prefix="model")
