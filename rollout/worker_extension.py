"""Methods added to every vLLM worker (passed as `worker_extension_cls`).

They run inside vLLM's worker processes and are reached with `LLM.collective_rpc`. Weights travel
to the worker as a safetensors file: tensors passed as RPC arguments through vLLM's multiprocess
executor arrive as Python lists, and a file in /dev/shm costs milliseconds for small models.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from protocol.weights import weight_fingerprint


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (bf16 included, which numpy cannot represent)."""
    return memoryview(t.detach().contiguous().view(torch.uint8).numpy())


class WeightReloadExtension:
    def apply_weights_file(self, path: str, fingerprint_names: list[str]) -> dict[str, str]:
        """Reload the model's weights in place from a safetensors file (checkpoint format).

        Tensors are read from the (memory-mapped) file one at a time as the model loads them, so
        the worker never holds a second copy of the whole model. Returns the fingerprint of the
        tensors as this worker received them, so the learner can check that the bytes it sent are
        the bytes that reached the engine.
        """
        wanted = set(fingerprint_names)
        fingerprint: dict[str, str] = {}
        with safe_open(path, framework="pt") as f:
            missing = sorted(wanted - set(f.keys()))
            if missing:
                raise KeyError(f"weight file {path} lacks fingerprinted tensors {missing}")

            def tensors():
                for name in f.keys():
                    t = f.get_tensor(name)
                    if name in wanted:  # hashed as received, before the model can transform it
                        fingerprint.update(weight_fingerprint({name: tensor_bytes(t)}))
                    yield name, t

            # `reload_weights` repacks weights for the CPU kernels after loading; calling
            # `model.load_weights` directly leaves the CPU backend's parameters empty.
            self.model_runner.reload_weights(weights_iterator=tensors())
        if set(fingerprint) != wanted:
            raise RuntimeError(f"the model did not read fingerprinted tensors {sorted(wanted - set(fingerprint))} from {path}")
        return dict(sorted(fingerprint.items()))
