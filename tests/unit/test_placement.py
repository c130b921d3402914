"""protocol.placement: the cores launch/local.sh gives the learner and each rollout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from protocol.config import ConfigError, load_config
from protocol.placement import parse_cores, plan


def placed(available, **overrides):
    p = plan(load_config(overrides={k: str(v) for k, v in overrides.items()}), available)
    return p.learner, p.learner_threads, p.learner_waits_passively, p.rollouts


def test_learner_on_every_core_rollouts_on_the_second_half():
    # training needs most of the arithmetic: the learner also takes the rollout cores while they idle
    assert placed([0, 1]) == ([0, 1], 2, True, [[1]])
    assert placed(list(range(8)), **{"rollout.num_processes": 2}) == (list(range(8)), 8, True, [[4, 5], [6, 7]])
    # more rollouts than the second half has cores: one core each from the last down, then they take turns
    assert placed([0, 1], **{"rollout.num_processes": 2})[3] == [[0], [1]]
    assert placed(list(range(8)), **{"rollout.num_processes": 6})[3] == [[2], [3], [4], [5], [6], [7]]
    assert placed([0, 1], **{"rollout.num_processes": 3})[3] == [[0], [1], [0]]
    assert placed([5], **{"rollout.num_processes": 2}) == ([5], 1, True, [[5], [5]])


def test_learner_threads_are_split_among_its_ranks():
    assert placed([0, 1], **{"train.learner_ranks": 2}) == ([0, 1], 1, True, [[1]])
    assert placed([0, 1], **{"train.learner_ranks": 2, "rollout.num_processes": 2})[3] == [[0], [1]]
    assert placed(list(range(8)), **{"train.learner_ranks": 4})[1] == 2


def test_explicit_cores():
    # disjoint lists: each side owns its cores, the learner's threads may spin
    assert placed(list(range(4)), **{"train.cpu_cores": "3", "rollout.cpu_cores": "0-2"}) == ([3], 1, False, [[0, 1, 2]])
    assert parse_cores("0-2,5", "k") == [0, 1, 2, 5]
    for bad in ("", "a-b", "1,1", "0-"):
        with pytest.raises(ConfigError, match="k: expected"):
            parse_cores(bad, "k")
    with pytest.raises(ConfigError, match=r"train.cpu_cores: cores \[7\] are not available"):
        placed([0, 1], **{"train.cpu_cores": "7"})


def test_command_line_prints_one_line_per_process():
    core = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-m", "protocol.placement", "--rollout.num_processes", "2",
                          "--train.cpu_cores", str(core), "--rollout.cpu_cores", str(core)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"learner {core} 1 passive", f"rollout 0 {core}", f"rollout 1 {core}"]


@pytest.mark.parametrize("preset", [{}, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_KVCACHE_SPACE": "7"},
                                    {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "7"}])
def test_rollout_sets_each_vllm_cpu_variable_unless_the_user_did(monkeypatch, preset):
    """A binding chosen by the user (or launch/local.sh) must not skip the KV cache size: without it
    vLLM reserves most of the machine's memory. Each variable is set on its own, a preset one kept."""
    import torch

    from rollout.engine import configure_cpu_threads

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in preset.items():
        monkeypatch.setenv(name, value)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    configure_cpu_threads(load_config(overrides={"rollout.kv_cache_space_gib": "3"}).rollout, process_index=0)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == preset.get("VLLM_CPU_KVCACHE_SPACE", "3")
    first_core = str(min(os.sched_getaffinity(0)))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == preset.get("VLLM_CPU_OMP_THREADS_BIND", first_core)
    assert threads == [1]  # one torch thread per bound core
