"""Two "nodes" on one machine: the learner (launch/learner.sh) and a rollout (launch/rollouts.sh) in
two network namespaces joined by a veth pair, talking over their own non-loopback addresses.

Needs root and iproute2 (`ip netns`). The namespaces, the veth pair and the /30 between them exist
only for the test and are removed at the end (also on failure), with every process inside them.

The connection is CURVE-authenticated and encrypted (keys generated with `python -m protocol.keys`
into the test's directory): off the loopback interface the launch scripts refuse plain TCP, which
the test checks first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, leftover_processes, stop

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 `ip` to create network namespaces"),
]

STEPS = 4
LEARNER_ADDR, ROLLOUT_ADDR, PREFIX = "10.213.7.1", "10.213.7.2", 30
PORT = 29411
PY = os.environ.get("STREAMRLHF_VENV", str(ROOT / ".venv")) + "/bin/python"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()}


class NetnsPair:
    """Namespaces `learner` and `rollout`, each with lo up and one end of a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.learner, self.rollout = f"srlhf-l{tag}", f"srlhf-r{tag}"
        self.names = (self.learner, self.rollout)
        veth_l, veth_r = f"srl{tag}l", f"srl{tag}r"  # interface names: at most 15 characters
        for ns in self.names:
            ip("netns", "add", ns)
        ip("link", "add", veth_l, "netns", self.learner, "type", "veth", "peer", "name", veth_r, "netns", self.rollout)
        for ns, dev, addr in ((self.learner, veth_l, LEARNER_ADDR), (self.rollout, veth_r, ROLLOUT_ADDR)):
            ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def remove(self) -> None:
        """Kill whatever still runs inside, then delete both namespaces (the veth pair goes with them)."""
        for ns in self.names:
            if ns not in namespaces():
                continue
            for _ in range(20):
                pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
            ip("netns", "del", ns, check=False)


@pytest.fixture
def netns_pair(request):
    created = []

    def cleanup():
        for pair in created:
            pair.remove()
        # a half-built pair (NetnsPair raised) leaves namespaces with this test's names
        tag = f"{os.getpid() % 100000}"
        for ns in (f"srlhf-l{tag}", f"srlhf-r{tag}"):
            if ns in namespaces():
                ip("netns", "del", ns, check=False)

    request.addfinalizer(cleanup)
    try:
        pair = NetnsPair()
    except subprocess.CalledProcessError as exc:
        cleanup()
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    created.append(pair)
    return pair


def test_learner_and_rollout_in_two_network_namespaces(netns_pair, tmp_path):
    prepared = subprocess.run([PY, "-m", "learner.tasks.arithmetic", "prepare", "--out", str(tmp_path / "task"),
                               "--sft-steps", "20"], cwd=ROOT, capture_output=True, text=True, check=True)
    task = json.loads(prepared.stdout.strip().splitlines()[-1])
    run_id = f"e2e-netns-{os.getpid()}-{time.monotonic_ns()}"
    common = ["--config", "configs/tiny.yaml", "--model.path", task["model"], "--data.path", task["prompts"],
              "--run_id", run_id, "--transport.port", str(PORT), "--train.num_steps", str(STEPS),
              "--rollout.num_processes", "1", "--output.progress", "false", "--output.save_final", "false"]
    learner_flags = [*common, "--transport.bind_host", LEARNER_ADDR, "--output.dir", str(tmp_path / "learner")]
    rollout_flags = [*common, "--transport.learner_host", LEARNER_ADDR, "--output.dir", str(tmp_path / "rollout")]
    learner_cmd = [*netns_pair.exec(netns_pair.learner), "bash", str(ROOT / "launch" / "learner.sh")]
    rollout_cmd = [*netns_pair.exec(netns_pair.rollout), "bash", str(ROOT / "launch" / "rollouts.sh"), "--count", "1"]

    # Off the loopback interface without CURVE, both scripts refuse before starting anything.
    for cmd in ([*learner_cmd, *learner_flags], [*rollout_cmd, *rollout_flags]):
        refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "not a loopback address, and CURVE is off" in refused.stderr, refused.stderr

    keys = tmp_path / "keys"
    subprocess.run([PY, "-m", "protocol.keys", "generate", str(keys), "--name", "learner", "--name", "rollout-0"],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    curve = ["--transport.curve_dir", str(keys)]
    learner_log, rollout_log = tmp_path / "learner.out", tmp_path / "rollouts.out"
    with open(learner_log, "w") as lout, open(rollout_log, "w") as rout:
        learner = subprocess.Popen([*learner_cmd, *learner_flags, *curve], cwd=ROOT, stdout=lout,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        rollouts = subprocess.Popen([*rollout_cmd, *rollout_flags, *curve], cwd=ROOT, stdout=rout,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        learner_rc = rollouts_rc = "still running"
        try:
            learner_rc = learner.wait(timeout=600)
            rollouts_rc = rollouts.wait(timeout=60)  # the learner's Shutdown ends them at once
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop(learner)
            stop(rollouts)
    output = learner_log.read_text()[-4000:] + "\n--- rollouts.sh\n" + rollout_log.read_text()[-2000:]
    logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*/logs/*.log")))
    if learner_rc or rollouts_rc:
        print(output, logs, file=sys.stderr)

    assert learner_rc == 0, output + logs
    assert rollouts_rc == 0, output + logs
    assert "CURVE on" in learner_log.read_text() and "CURVE on" in rollout_log.read_text()
    assert "all 1 rollout(s) finished" in rollout_log.read_text()
    assert (tmp_path / "rollout" / "logs" / "rollout-0.log").exists()  # the rollout's log on its own "node"
    metrics = [json.loads(line) for line in (tmp_path / "learner" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(STEPS))
    applied = json.loads((tmp_path / "learner" / "summary.json").read_text())["applied_versions"]
    assert len(applied) == 1, applied
    versions = next(iter(applied.values()))
    # every version some step needed (configs/tiny.yaml: max_staleness 1; the last one may be acked
    # after the run ended)
    assert set(range(STEPS - 1)) <= set(versions), f"the rollout applied {versions}"
    assert not leftover_processes(run_id)

    netns_pair.remove()
    assert not set(netns_pair.names) & namespaces(), "the test's network namespaces were not removed"
    assert not [line for line in ip("link", "show").stdout.splitlines() if f"srl{os.getpid() % 100000}" in line]
