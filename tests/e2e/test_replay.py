"""Record a real run (vLLM rollouts, DeepSpeed learner), replay it from disk with no rollouts."""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from learner.recording.store import RecordingReader
from protocol import decode
from protocol.messages import SamplingSpec
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e


def first_sample_seed(run_config: dict, batch) -> int:
    """The seed of a batch's first sample: sample number grant id x prompts per grant x n."""
    r = run_config["rollout"]
    spec = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=1, stop_token_ids=[], seed=r["seed"])
    return spec.sample_seed(batch.grant_id * r["prompts_per_grant"] * r["n_samples_per_prompt"])


def test_replay_reproduces_losses_and_weights(run_local, tmp_path):
    recorded = run_local("--train.num_steps", "6", "--output.record", "true", "--rollout.num_processes", "1")
    assert recorded.returncode == 0, recorded.output[-3000:]
    recording = recorded.run_dir / "recording"

    check = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "learner.recording.inspect", str(recording),
                            "--validate", "--steps"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # each step record names the messages it trained on and the sampling seed of each (its first sample's)
    reader = RecordingReader(recording)
    step_records = list(reader.steps())
    assert [r.step for r in step_records] == list(range(6))
    for rec in step_records:
        batches = [decode(reader.record(n).frames).body for n in rec.info["consumed"]]
        assert rec.info["seeds"]["sampling"] == [first_sample_seed(reader.header["run_config"], b) for b in batches]

    replay_dir = tmp_path / "replay"
    replay = subprocess.run(["bash", str(ROOT / "launch/replay.sh"), str(recording), "--output.dir", str(replay_dir),
                             "--output.progress", "false"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]

    def losses(run_dir):
        return [(m["step"], m["policy_loss"], m["reward_mean"]) for m in
                map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    assert losses(replay_dir) == losses(recorded.run_dir)
    # step 0's completions (output.log_samples_every 10 logs step 0 of 6): 4 prompts x 8 samples, replayed alike
    logged = (recorded.run_dir / "samples.jsonl").read_text().splitlines()
    assert len(logged) == 4 * 8 and {json.loads(line)["step"] for line in logged} == {0}
    assert (replay_dir / "samples.jsonl").read_text().splitlines() == logged
    original, replayed = load_file(recorded.run_dir / "final/model.safetensors"), load_file(replay_dir / "final/model.safetensors")
    assert original.keys() == replayed.keys()
    assert all(original[k].equal(replayed[k]) for k in original), "replayed final weights differ"

    # stop at step 2 and dump what that step trained on
    partial_dir = tmp_path / "partial"
    partial = subprocess.run(["bash", str(ROOT / "launch/replay.sh"), str(recording), "--output.dir", str(partial_dir),
                              "--replay.stop_after_step", "2", "--output.progress", "false",
                              "--output.save_final", "false"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert partial.returncode == 0, partial.stderr[-3000:]
    dump = json.loads((partial_dir / "replay_step_2.json").read_text())
    assert len(dump["sequences"]) == 16 * 8 and dump["metrics"]["policy_loss"] == losses(recorded.run_dir)[2][1]
    assert len((partial_dir / "metrics.jsonl").read_text().splitlines()) == 3
