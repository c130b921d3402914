"""Weight versions relayed rollout to rollout (transport.weight_relay_fanout), with real vLLM engines."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time

import pytest

from tests.e2e.conftest import ROOT, leftover_processes, processes_mentioning

pytestmark = pytest.mark.e2e


def update_bytes() -> int:
    """Bytes of one weight version of the built-in task's model in the engine dtype (float32)."""
    from safetensors import safe_open

    from learner.tasks.arithmetic import prepare

    model = prepare(ROOT / "runs" / "arithmetic")["model"]
    total = 0
    for path in sorted(os.listdir(model)):
        if path.endswith(".safetensors"):
            with safe_open(os.path.join(model, path), framework="pt") as f:
                for name in f.keys():
                    numel = 1
                    for dim in f.get_slice(name).get_shape():
                        numel *= dim
                    total += 4 * numel
    return total


def test_three_rollouts_in_a_chain_apply_every_version_from_one_copy_sent(run_local):
    """Rank 0 sends each version once, to the head of a chain of three rollouts; every rollout applies
    every version (the run checks each acknowledgement's fingerprint against the learner's)."""
    steps = 8
    result = run_local("--train.num_steps", str(steps), "--rollout.num_processes", "3",
                       "--transport.weight_relay_fanout", "1", "--output.save_final", "false")
    assert result.returncode == 0, result.output[-3000:]
    applied = result.summary["applied_versions"]
    assert len(applied) == 3, applied
    for producer, versions in applied.items():  # with max_staleness 1, step s needs version s - 1
        assert set(range(steps - 1)) <= set(versions), f"{producer} applied only {versions}"
    published, sent = steps + 1, result.summary["weight_bytes_sent"]  # versions 0..steps
    # one copy per version from rank 0: each bucket goes once credited, so the last version, which no
    # rollout needs, may still be on its way when the run ends
    assert (published - 1) * update_bytes() <= sent <= published * update_bytes(), sent
    assert not leftover_processes(result.run_id)


def test_a_frozen_relay_node_does_not_keep_later_versions_from_the_others(run_local, tmp_path):
    """SIGSTOP a rollout that relays versions to another mid-run: the learner drops it when it does not
    apply a version, sends the versions it held up straight to the rollouts below it, and the run
    finishes with the two others applying every later version. The frozen one is thawed afterwards and rejoins or leaves."""
    steps, frozen = 20, {}

    def a_relay_node() -> int | None:
        """A rollout that forwards versions to another one (rollout.weight_stream logs it)."""
        for log in sorted((tmp_path / "run" / "logs").glob("rollout-*.log")):
            if re.search(r"relaying weight version \d+ to \['rollout-", log.read_text()):
                return int(log.stem.split("-")[1])
        return None

    def freeze_then_thaw():
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "pid" not in frozen:
            index = a_relay_node()
            if index is not None and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                for line in processes_mentioning(str(tmp_path)):
                    pid = int(line.split(":")[0])
                    if f"-m rollout --index {index}" in line and os.getpgid(pid) == pid:
                        os.kill(pid, signal.SIGSTOP)  # the rollout process itself: it relays nothing more
                        frozen.update(pid=pid, index=index, at_step=len(metrics.read_text().splitlines()))
                        break
            time.sleep(0.2)
        while time.monotonic() < deadline and len(metrics.read_text().splitlines()) < frozen.get("at_step", 0) + 6:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(frozen["pid"], signal.SIGCONT)

    freezer = threading.Thread(target=freeze_then_thaw, daemon=True)
    freezer.start()
    result = run_local("--train.num_steps", str(steps), "--rollout.num_processes", "3",
                       "--transport.weight_relay_fanout", "1", "--transport.weight_ack_timeout_s", "8",
                       "--transport.progress_timeout_s", "8", "--output.save_final", "false")
    freezer.join(timeout=30)
    assert frozen.get("pid"), "the test never found a relaying rollout"
    assert result.returncode == 0, result.output[-3000:]
    assert len(result.metrics) == steps
    assert result.summary["dropped_rollouts"] >= 1
    survivors = {p: v for p, v in result.summary["applied_versions"].items()
                 if not p.startswith(f"rollout-{frozen['index']}@")}
    assert len(survivors) == 2, result.summary["applied_versions"]
    for producer, versions in survivors.items():
        # every version once the frozen node was out of the tree; one that was published while it was
        # still in (at most the first two after the freeze) may be skipped for the newer one the learner
        # sent straight. A rollout below the frozen node may also give up on the stalled version and
        # say hello again (its list then starts at the version it got on hello): either way it goes on.
        needed = range(frozen["at_step"] + 3, steps - 1)  # the last step needs version steps - 2
        assert set(needed) <= set(versions), f"{producer} applied only {versions}"
    assert not leftover_processes(result.run_id)
