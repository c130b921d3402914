"""Methods added to every vLLM worker (passed as `worker_extension_cls`).

They run inside vLLM's workers and are reached with `LLM.collective_rpc`. A worker in the rollout's
own process (tensor_parallel_size 1) gets the received tensors themselves; workers in other
processes get a safetensors file, because tensors passed as RPC arguments through vLLM's
multiprocess executor arrive as Python lists (a file in /dev/shm costs milliseconds for small models).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from safetensors import safe_open

from protocol.buffers import tensor_bytes
from protocol.weights import weight_fingerprint


class WeightReloadExtension:
    def apply_weights_file(self, path: str, fingerprint_names: list[str]) -> dict[str, str]:
        """Reload the model's weights in place from a safetensors file (checkpoint format).

        For engines whose workers are other processes. Tensors are read from the (memory-mapped)
        file one at a time as the model loads them, so the worker never holds a second copy of the
        whole model.
        """
        with safe_open(path, framework="pt") as f:
            missing = sorted(set(fingerprint_names) - set(f.keys()))
            if missing:
                raise KeyError(f"weight file {path} lacks fingerprinted tensors {missing}")
            return self.apply_weights(((name, f.get_tensor(name)) for name in f.keys()), fingerprint_names,
                                      source=path)

    def apply_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], fingerprint_names: list[str],
                      source: str = "the update") -> dict[str, str]:
        """Reload the model's weights in place from (name, tensor) pairs, consumed one at a time.

        Called directly (no copy) when the worker runs in the rollout's own process. Returns the
        fingerprint of the fingerprinted tensors as this worker received them, so the learner can
        check that the bytes it sent are the bytes that reached the engine.
        """
        wanted = set(fingerprint_names)
        fingerprint: dict[str, str] = {}

        def tensors():
            for name, t in named_tensors:
                if name in wanted:  # hashed as received, before the model can transform it
                    fingerprint.update(weight_fingerprint({name: tensor_bytes(t)}))
                yield name, t

        # `reload_weights` repacks weights for the CPU kernels after loading; calling
        # `model.load_weights` directly leaves the CPU backend's parameters empty.
        self.model_runner.reload_weights(weights_iterator=tensors())
        if set(fingerprint) != wanted:
            raise RuntimeError(f"the model did not read fingerprinted tensors {sorted(wanted - set(fingerprint))} "
                               f"from {source}")
        return dict(sorted(fingerprint.items()))
