"""SIGKILL the learner mid-run, resume from its checkpoint: training continues, no prompt lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from learner.recording.store import RecordingError, RecordingReader
from protocol import ProtocolError, decode
from tests.e2e.conftest import leftover_processes, processes_mentioning

pytestmark = pytest.mark.e2e

STEPS = 30


def untrained_batch_recorded(recording) -> bool:
    """Whether the live recording holds a packed batch received after its last step record:
    a batch of a step not trained yet, which a crash now leaves for the resumed run to reuse."""
    after_last_step = False
    try:
        for rec in RecordingReader(recording, on_damage="stop"):
            if rec.kind == "step":
                after_last_step = False
            else:
                try:
                    after_last_step = after_last_step or decode(rec.frames).kind == "packed_batch"
                except ProtocolError:
                    pass
    except (RecordingError, FileNotFoundError):  # not written yet
        return False
    return after_last_step


def test_learner_killed_and_resumed(run_local, tmp_path):
    run_dir = tmp_path / "run"
    killed = {}

    def kill_learner_mid_run():
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4 \
                    and untrained_batch_recorded(run_dir / "recording"):
                for line in processes_mentioning("-m learner "):
                    pid = int(line.split(":")[0])
                    if str(tmp_path) in line and os.getpgid(pid) == pid:
                        os.kill(pid, signal.SIGKILL)
                        killed["at_lines"] = len(metrics.read_text().splitlines())
                        return
            time.sleep(0.1)

    flags = ("--train.num_steps", str(STEPS), "--train.save_every", "1", "--output.record", "true")
    killer = threading.Thread(target=kill_learner_mid_run, daemon=True)
    killer.start()
    first = run_local(*flags)
    killer.join(timeout=1)
    assert killed, "the learner was never killed"
    assert first.returncode != 0
    assert not leftover_processes(first.run_id), "a dead learner must take its rollouts down with it"
    state = json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                        / "learner_state.json").read_text())
    saved = state["step"]
    assert state["recording_position"] > 0, "the checkpoint says how far into the recording its steps reached"

    second = run_local(*flags, "--train.resume", "true")
    assert second.returncode == 0, second.output[-3000:]
    assert f"continuing at step {saved + 1}" in second.output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(STEPS)), "every step logged exactly once across the crash"
    consumed = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [c["step"] for c in consumed] == list(range(STEPS))
    ids = [p for c in consumed for p in c["prompt_ids"]]
    for start in range(0, len(ids) - 99, 100):
        assert sorted(ids[start: start + 100]) == list(range(100)), f"epoch starting at sample {start}"
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 2, "only the newest 2 checkpoints are kept"
    # batches the crashed run received (and recorded) but never trained on are not generated again
    assert second.summary["reused_recorded_batches"] >= 1
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert not leftover_processes(second.run_id)
