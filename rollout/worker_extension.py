"""Methods added to every vLLM worker (passed as `worker_extension_cls`).

They run inside vLLM's worker processes and are reached with `LLM.collective_rpc`. Weights travel
to the worker as a safetensors file: tensors passed as RPC arguments through vLLM's multiprocess
executor arrive as Python lists, and a file in /dev/shm costs milliseconds for small models.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from protocol.weights import weight_fingerprint


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (bf16 included, which numpy cannot represent)."""
    return memoryview(t.detach().contiguous().view(torch.uint8).numpy())


class WeightReloadExtension:
    def apply_weights_file(self, path: str, fingerprint_names: list[str]) -> dict[str, str]:
        """Reload the model's weights in place from a safetensors file (checkpoint format).

        Returns the fingerprint of the tensors as this worker received them, so the learner can
        check that the bytes it sent are the bytes that reached the engine.
        """
        tensors = load_file(path)
        missing = [n for n in fingerprint_names if n not in tensors]
        if missing:
            raise KeyError(f"weight file {path} lacks fingerprinted tensors {missing}")
        # `reload_weights` repacks weights for the CPU kernels after loading; calling
        # `model.load_weights` directly leaves the CPU backend's parameters empty.
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        return weight_fingerprint({n: tensor_bytes(tensors[n]) for n in fingerprint_names})
