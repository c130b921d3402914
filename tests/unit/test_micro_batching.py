"""Micro-batching by tokens in `PPOTrainer.score` and `train_step`, and model.gradient_checkpointing.

Peak memory cannot be read reliably on the CPU, so these tests check what bounds it, on a real
model whose vocabulary (4096) dwarfs its hidden size (128), as real vocabularies do:

* every forward of every model, in both passes, sees at most train.micro_batch_tokens tokens;
* the activations autograd keeps for backward (counted through saved-tensor hooks) peak at the
  same size whether a step has one micro-batch or four, and none of a micro-batch's is alive when
  the next one's forward starts (an unused branch such as the metrics-only entropy used to keep the
  [T, V] logits of the previous micro-batch);
* the gradients of a step split into micro-batches equal those of one big batch (actor and critic);
* gradient checkpointing gives the same gradients, keeps fewer activations and recomputes each
  decoder layer once per micro-batch in backward.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from deepspeed.utils import safe_get_full_grad

from learner.tiny.model import TinyModelSpec, build_tiny_model
from protocol.messages import PackedBatch
from tests.unit.test_trainer import batch, make_trainer, model_dir, score_batches  # noqa: F401 (fixture)

SEQ_TOKENS = 16  # every sequence of `uniform_batch`: 4 prompt and 12 response tokens
BUDGET = 4 * SEQ_TOKENS  # micro_batch_tokens: one prompt group of 4 samples per micro-batch


@pytest.fixture(scope="module")
def big_vocab_dir(model_dir, tmp_path_factory):  # model_dir: one learner rank (gloo) for the module
    return str(build_tiny_model(tmp_path_factory.mktemp("vocab4096"), TinyModelSpec(vocab_size=4096)))


def uniform_batch(n_prompts: int, n: int = 4, seed: int = 0) -> PackedBatch:
    """`n_prompts` groups of `n` sequences of SEQ_TOKENS tokens: every micro-batch has the same shape."""
    rng = np.random.default_rng(seed)
    b, plen = n_prompts * n, 4
    rlen = SEQ_TOKENS - plen
    return PackedBatch(grant_id=0, step=0, tokens=rng.integers(4, 60, b * SEQ_TOKENS),
                       cu_seqlens=np.arange(b + 1) * SEQ_TOKENS, prompt_lens=np.full(b, plen),
                       loss_mask=np.tile([0] * plen + [1] * rlen, b),
                       behaviour_logprobs=np.tile([0.0] * plen + list(-np.log(4096) + rng.normal(0, 0.3, rlen)), b),
                       prompt_ids=np.repeat(np.arange(n_prompts), n), sample_indices=np.tile(np.arange(n), n_prompts),
                       weight_versions=np.zeros(b, np.int32), last_weight_versions=np.zeros(b, np.int32),
                       finish_reasons=["stop"] * b, labels=[None] * b, gen_seconds=0.1)


class SavedActivations:
    """Bytes of the tensors autograd keeps for backward (parameters excluded), counted per storage
    while any saved tensor object on it is alive: `live` now, `peak` over the `with` block."""

    def __init__(self, parameters):
        self.parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, list[int]] = {}  # data pointer -> [bytes, saved tensor objects alive]
        self.tracked: set[int] = set()
        self.live = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in self.parameters or id(t) in self.tracked:
            return t
        self.tracked.add(id(t))
        entry = self.storages.setdefault(pointer, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self.release, id(t), pointer)
        return t

    def release(self, key: int, pointer: int) -> None:
        self.tracked.discard(key)
        entry = self.storages[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            del self.storages[pointer]
            self.live -= entry[0]

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def record_forwards(module: torch.nn.Module, name: str, calls: list) -> None:
    """Append (name, grad enabled, tokens) for every packed forward of `module`."""
    def hook(_module, args, kwargs):
        tokens = args[0] if args else kwargs["input_ids"]
        calls.append((name, torch.is_grad_enabled(), tokens.numel()))
    module.register_forward_pre_hook(hook, with_kwargs=True)


def test_every_forward_of_both_passes_sees_at_most_micro_batch_tokens(big_vocab_dir):
    # policy, reference and critic in the scoring pass; policy and critic in training
    trainer = make_trainer(big_vocab_dir, **{"train.micro_batch_tokens": str(BUDGET), "algo.kl_coef": "0.05",
                                            "algo.advantage_estimator": "gae"})
    calls = []
    for name, module in (("actor", trainer.actor_module), ("ref", trainer.ref), ("critic", trainer.critic.module)):
        record_forwards(module, name, calls)
    rng = np.random.default_rng(0)
    batches = [batch(g, rng, n_prompts=6) for g in range(2)]  # random lengths, 2 x 24 sequences
    step_tokens = sum(b.num_tokens for b in batches)
    parts = score_batches(trainer, batches)
    trainer.train_step(0, parts)
    assert len(parts) > 4 and all(tokens <= BUDGET for _, _, tokens in calls)
    for name, grad in [("actor", False), ("ref", False), ("critic", False), ("actor", True), ("critic", True)]:
        # each model sees every token of the step once per pass
        assert sum(t for n, g, t in calls if (n, g) == (name, grad)) == step_tokens, (name, grad)
    # what scoring keeps per micro-batch is per token: no [T, V] logits, no [T, H] hidden states
    kept = sum(t.numel() * t.element_size() for p in parts for t in vars(p).values() if isinstance(t, torch.Tensor))
    assert kept <= 64 * step_tokens


def saved_activations_of_a_step(model: str, n_prompts: int, **overrides) -> tuple[SavedActivations, list[int]]:
    """Train one step of `n_prompts` identical micro-batches; the saved activations and, at the start
    of each training forward, the bytes still saved from earlier micro-batches."""
    trainer = make_trainer(model, **{"train.micro_batch_tokens": str(BUDGET), **overrides})
    parts = score_batches(trainer, [uniform_batch(n_prompts)])
    assert len(parts) == n_prompts
    saved = SavedActivations(trainer.actor_module.parameters())
    alive_at_forward: list[int] = []
    trainer.actor_module.register_forward_pre_hook(lambda *_: alive_at_forward.append(saved.live))
    with saved:
        trainer.train_step(0, parts)
    return saved, alive_at_forward


@pytest.mark.parametrize("hidden", ["true", "false"], ids=["logprobs_from_hidden", "from_logits"])
def test_activations_kept_for_backward_do_not_grow_with_the_number_of_micro_batches(big_vocab_dir, hidden):
    one, alive_one = saved_activations_of_a_step(big_vocab_dir, 1, **{"model.logprobs_from_hidden": hidden})
    four, alive_four = saved_activations_of_a_step(big_vocab_dir, 4, **{"model.logprobs_from_hidden": hidden})
    assert alive_one == [0] and alive_four == [0, 0, 0, 0]
    # Only the slices of the step's per-token experience (advantages, masks, ...) that a loss keeps
    # grow with the step, by a few bytes per token: a micro-batch's activations are ~20 KB per token.
    extra_tokens = 3 * BUDGET
    assert one.peak > 1000 * BUDGET and one.peak <= four.peak <= one.peak + 64 * extra_tokens
    assert four.live == 0
    if hidden == "false":  # the logits path keeps a micro-batch's [T, V] logits until its backward
        assert one.peak >= BUDGET * 4096 * 4


def gradients_of_a_step(model: str, **overrides) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """The accumulated actor and critic gradients of one step on two fixed random batches, taken
    just before the optimizer step, with its metrics and the forwards of each first decoder layer
    while training (named by model)."""
    trainer = make_trainer(model, **{"algo.advantage_estimator": "gae", **overrides})
    rng = np.random.default_rng(0)
    parts = score_batches(trainer, [batch(g, rng) for g in range(2)])
    layer_forwards = []
    for name, backbone in (("actor", trainer.actor_module.model.model), ("critic", trainer.critic.module.model)):
        backbone.layers[0].register_forward_pre_hook(lambda *_, name=name: layer_forwards.append(name))
    grads = {}
    for name, engine in (("actor", trainer.actor), ("critic", trainer.critic)):
        def step_after_reading_gradients(step=engine.optimizer.step, name=name, module=engine.module, **kwargs):
            grads.update({f"{name}.{n}": safe_get_full_grad(p).clone() for n, p in module.named_parameters()})
            return step(**kwargs)
        engine.optimizer.step = step_after_reading_gradients
    metrics = trainer.train_step(0, parts)
    return grads, metrics, layer_forwards


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for model in ("actor.", "critic."):
        assert any(g.abs().max() > 0 for name, g in expected.items() if name.startswith(model)), model
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_accumulate_exactly_across_micro_batches(big_vocab_dir):
    whole, whole_metrics, _ = gradients_of_a_step(big_vocab_dir, **{"train.micro_batch_tokens": "100000"})
    split, split_metrics, _ = gradients_of_a_step(big_vocab_dir, **{"train.micro_batch_tokens": "48"})
    assert_same_gradients(split, whole)
    for key in ("policy_loss", "value_loss", "grad_norm", "entropy", "kl_behaviour"):
        assert split_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-4, abs=1e-7), key


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(big_vocab_dir):
    plain, plain_metrics, plain_forwards = gradients_of_a_step(big_vocab_dir)
    checkpointed, metrics, forwards = gradients_of_a_step(big_vocab_dir, **{"model.gradient_checkpointing": "true"})
    assert_same_gradients(checkpointed, plain)
    assert metrics["policy_loss"] == pytest.approx(plain_metrics["policy_loss"], rel=1e-5)
    for name in ("actor", "critic"):  # one forward per training micro-batch, and its recomputation in backward
        micro_batches = plain_forwards.count(name)
        assert micro_batches >= 2 and forwards.count(name) == 2 * micro_batches, name
    overrides = {"model.logprobs_from_hidden": "true"}
    kept, _ = saved_activations_of_a_step(big_vocab_dir, 2, **overrides)
    kept_checkpointed, alive = saved_activations_of_a_step(big_vocab_dir, 2, **overrides,
                                                           **{"model.gradient_checkpointing": "true"})
    assert alive == [0, 0] and 0 < kept_checkpointed.peak < kept.peak / 2
