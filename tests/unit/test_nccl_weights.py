"""transport.weight_transfer nccl on a machine without a GPU: what can be checked here.

The refusals at start-up are real. The learner's hub runs for real over ZeroMQ, and the rollout's
workers' receiving code for real, with the NCCL communicator replaced by stand-ins: one that records
what learner rank 0 broadcasts, one that hands a worker the bytes rank 0 would have broadcast. Neither
CUDA nor NCCL runs here (README: NCCL weight transfer, what was and was not run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import threading
import types

import msgpack
import numpy as np

import pytest
import torch

from learner.hub.factory import connect_rollouts
from learner.hub.nccl_fanout import NcclWeightFanout
from learner.hub.rollout_hub import RolloutFailure, RolloutHub
from learner.training.weight_sync import build_weight_update
from protocol.config import ConfigError, RunConfig, check_weight_transfer_device, load_config
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat, Hello, RolloutError, Shutdown, WeightGroupInvite, WeightHeader, WeightUpdate
from protocol.network_policy import InsecureTransportError, check_transport_security
from protocol.transport import LearnerEndpoint
from rollout.main import RolloutWorker, check_nccl_member
from rollout.weight_stream import IncomingUpdate
from rollout.worker_extension import WeightReloadExtension
from tests.unit.test_entry_points import _rollout_flags, run_inputs  # noqa: F401 - a fixture
from tests.unit.test_hub import RUN, ScriptedPeer, eventually, make_update

pytestmark = pytest.mark.timeout(60)

NCCL = {"transport.weight_transfer": "nccl"}  # the relay fanout keeps its default: it applies to zmq only


# --------------------------------------------------------------------------- start-up refusals


def test_a_consistent_nccl_config_loads_and_numbers_the_group():
    cfg = load_config(overrides={**NCCL, "rollout.num_processes": "3", "rollout.tensor_parallel_size": "2"})
    assert cfg.nccl_world_size() == 7  # rank 0 and 3 rollouts x 2 workers
    assert [cfg.nccl_first_rank(i) for i in range(3)] == [1, 3, 5]


@pytest.mark.parametrize("change, named", [
    ({"transport.relay_host": "127.0.0.1"}, "transport.relay_host"),
    ({"transport.min_live_rollouts": "1"}, "transport.min_live_rollouts"),
    ({"rollout.on_learner_lost": "wait"}, "rollout.on_learner_lost"),
    ({"rollout.inflight_update": "finish"}, "rollout.inflight_update"),
])
def test_nccl_with_an_option_it_cannot_honour_is_refused_naming_both(change, named):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={**NCCL, **change})
    assert "transport.weight_transfer nccl" in str(exc.value) and named in str(exc.value)


def test_nccl_without_cuda_is_refused_on_either_side_in_one_line():
    cfg = load_config(overrides=NCCL)
    for role in ("learner", "rollout"):
        with pytest.raises(ConfigError, match=f"^transport.weight_transfer nccl needs a CUDA device on the {role}"):
            check_weight_transfer_device(cfg, role, cuda_available=False)
        check_weight_transfer_device(cfg, role, cuda_available=True)
    check_weight_transfer_device(RunConfig(), "learner", cuda_available=False)  # zmq needs none


def test_the_entry_points_refuse_nccl_on_this_cpu_machine(capsys, run_inputs):  # noqa: F811
    import learner.main as learner_main
    import rollout.main as rollout_main

    flags = [*run_inputs, *[part for key, value in NCCL.items() for part in (f"--{key}", value)]]
    with pytest.raises(SystemExit) as exc:
        learner_main.main(flags)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: transport.weight_transfer nccl needs a CUDA device on the learner, and torch finds none here; "
        "use transport.weight_transfer zmq"]
    assert rollout_main.main(_rollout_flags(flags)) == 3
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "error: transport.weight_transfer nccl needs a CUDA device on the rollout")


def test_a_rollout_index_outside_the_group_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(overrides={**NCCL, "rollout.num_processes": "2"})
    check_nccl_member(cfg, 1)
    with pytest.raises(ConfigError, match=r"--index 2 has no place .* rollout.num_processes 2"):
        check_nccl_member(cfg, 2)


def test_nccl_off_loopback_needs_explicit_trust_even_with_curve(tmp_path):
    cfg = load_config(overrides={**NCCL, "transport.bind_host": "0.0.0.0", "transport.curve_dir": str(tmp_path)})
    with pytest.raises(InsecureTransportError, match="transport.weight_transfer nccl with transport.bind_host"):
        check_transport_security(cfg)
    cfg.transport.curve_required_off_loopback = False
    assert check_transport_security(cfg) is True  # CURVE still on for ZeroMQ
    check_transport_security(load_config(overrides=NCCL))  # loopback


# --------------------------------------------------------------------------- learner rank 0


class RecordingGroup:
    """Stands in for rank 0's PyNcclCommunicator: records every broadcast."""

    def __init__(self):
        self.sent: list[tuple[int, bytes]] = []

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.sent.append((src, tensor.numpy().tobytes()))


class Group:
    """A learner hub on real ZeroMQ with an NCCL fan-out whose communicator is a RecordingGroup."""

    def __init__(self, endpoint: LearnerEndpoint, rollouts: int, join=None):
        self.group = RecordingGroup()
        self.cfg = load_config(overrides={**NCCL, "rollout.num_processes": str(rollouts),
                                          "transport.batch_timeout_s": "5"})
        self.group_id = bytes(range(128))
        self.hub = RolloutHub(endpoint, ack_timeout_s=60.0, fanout=functools.partial(
            NcclWeightFanout, group_id=self.group_id, world_size=self.cfg.nccl_world_size(),
            first_rank=self.cfg.nccl_first_rank, join=join or (lambda: self.group), device="cpu",
            rollouts=rollouts, timeout_s=5.0))


@pytest.fixture
async def nccl_env():
    """(group, peers factory): a hub serving on a real endpoint, scripted rollouts saying hello with an index."""
    endpoint = LearnerEndpoint(RUN)
    setups: list[Group] = []
    servers, peers = [], []

    def start(rollouts: int, join=None) -> Group:
        setup = Group(endpoint, rollouts, join)
        setups.append(setup)
        servers.append(asyncio.create_task(setup.hub.serve()))
        return setup

    async def connect(producer_id: str, index: int) -> ScriptedPeer:
        peer = ScriptedPeer(endpoint.address, producer_id)
        peers.append(peer)
        await peer.send(Hello(engine_info={"index": index}))
        return peer

    try:
        yield start, connect
    finally:
        for server in servers:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
        for peer in peers:
            peer.close()
        endpoint.close()


async def formed(start, connect, rollouts: int = 2):
    setup = start(rollouts)
    peers = [await connect(f"rollout-{i}", i) for i in range(rollouts)]
    for index, peer in enumerate(peers):  # each is invited before the group forms, at its own ranks
        invite = await peer.recv_kind(WeightGroupInvite)
        assert invite.unique_id.tobytes() == setup.group_id
        assert (invite.first_rank, invite.world_size) == (setup.cfg.nccl_first_rank(index), rollouts + 1)
    await connect_rollouts(setup.cfg, setup.hub)
    return setup, peers


async def test_each_version_is_a_header_over_zeromq_and_its_buckets_broadcast_from_rank_0(nccl_env):
    setup, peers = await formed(*nccl_env)
    assert setup.hub.fanout.members == {b"rollout-0", b"rollout-1"}
    update = make_update(0)
    assert len(update.buckets) > 1
    await setup.hub.publish(update)
    for peer in peers:
        header = await peer.recv_kind(WeightHeader)
        assert header.version == 0 and header.relay == [] and header.fingerprint == update.fingerprint
        assert header.bucket_sizes == [memoryview(b).nbytes for b in update.buckets]
        await peer.expect_nothing()  # no bucket comes over ZeroMQ
        await peer.ack(update)
    assert setup.group.sent == [(0, bytes(b)) for b in update.buckets]  # one copy, in order
    await eventually(lambda: setup.hub.applied_versions() == {"rollout-0": [0], "rollout-1": [0]})
    assert setup.hub.stats()["weight_bytes_sent"] == update.total_bytes


async def test_a_rollout_connecting_after_the_group_formed_is_turned_away(nccl_env):
    start, connect = nccl_env
    setup, _ = await formed(start, connect)
    late = await connect("rollout-2", 1)
    assert "connected after the NCCL weight group formed" in (await late.recv_kind(Shutdown)).reason
    assert setup.hub.discarded["refused_rollout"] == 1 and setup.hub.failure is None
    assert set(setup.hub.peers) == {b"rollout-0", b"rollout-1"}


@pytest.mark.parametrize("leave", ["hello again", "fatal error"])
async def test_a_member_leaving_the_group_stops_the_run(nccl_env, leave):
    start, connect = nccl_env
    setup, peers = await formed(start, connect)
    if leave == "hello again":
        await peers[1].send(Hello(engine_info={"index": 1}))
    else:
        await peers[1].send(RolloutError(message="CUDA error", fatal=True))
    await eventually(lambda: setup.hub.failure is not None)
    assert isinstance(setup.hub.failure, RolloutFailure)
    assert "rollout-1" in str(setup.hub.failure) and "restart the run (--train.resume)" in str(setup.hub.failure)


@pytest.mark.parametrize("indexes, problem", [([0, 0], "as another connected rollout does"),
                                              ([0, 2], "takes indexes 0..1")])
async def test_rollouts_whose_indexes_cannot_form_the_group_stop_the_run(nccl_env, indexes, problem):
    start, connect = nccl_env
    setup = start(2)
    for i, index in enumerate(indexes):
        await connect(f"rollout-{i}", index)
    await eventually(lambda: setup.hub.failure is not None)
    assert problem in str(setup.hub.failure)


async def test_a_group_that_does_not_form_times_out_in_one_line(nccl_env):
    start, _ = nccl_env
    never = threading.Event()
    setup = start(1, join=never.wait)  # a member never joins: the rendezvous would wait forever
    with pytest.raises(TimeoutError, match=r"NCCL weight group did not form \(a rollout never joined: see its log\) within 0.2 s"):
        await setup.hub.fanout.form(0.2)
    never.set()


# --------------------------------------------------------------------------- rollout workers


class ReplayingGroup:
    """Stands in for a worker's PyNcclCommunicator: each broadcast receives the next bucket rank 0 sends."""

    def __init__(self, update: WeightUpdate):
        self.buckets = [bytes(b) for b in update.buckets]

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        assert src == 0 and tensor.dtype == torch.uint8
        tensor.copy_(torch.frombuffer(bytearray(self.buckets.pop(0)), dtype=torch.uint8))


class StandInWorker(WeightReloadExtension):
    """A vLLM worker reduced to what the extension uses: its rank, device and model runner."""

    def __init__(self, rank: int = 0):
        self.rank, self.device, self.loaded = rank, torch.device("cpu"), {}
        self.model_runner = self

    def reload_weights(self, weights_iterator) -> None:
        for name, tensor in weights_iterator:
            self.loaded[name] = tensor.clone()


def learner_update(version: int) -> tuple[WeightUpdate, dict[str, torch.Tensor]]:
    """An update as learner rank 0 builds it (bfloat16 engine weights, several buckets)."""
    weights = {"embed.weight": torch.randn(16, 8), "layers.0.mlp.weight": torch.randn(8, 8),
               "layers.0.norm.weight": torch.randn(8), "lm_head.weight": torch.randn(16, 8)}
    update = build_weight_update(version, weights.items(), dtype=torch.bfloat16, bucket_bytes=300)
    return update, {name: t.to(torch.bfloat16) for name, t in weights.items()}


def test_a_worker_loads_the_broadcast_buckets_as_laid_out_by_the_header_and_fingerprints_them():
    update, expected = learner_update(3)
    assert len(update.buckets) > 2
    worker = StandInWorker()
    worker.weight_group = ReplayingGroup(update)
    layout = IncomingUpdate(update.header()).layout()
    fingerprint = worker.apply_weights_nccl(layout, sorted(update.fingerprint), timeout_s=5.0)
    assert fingerprint == update.fingerprint
    assert worker.weight_group.buckets == []  # every bucket received
    assert worker.loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert worker.loaded[name].dtype == torch.bfloat16 and torch.equal(worker.loaded[name], tensor)


def test_each_worker_joins_at_its_rollouts_first_rank_plus_its_own(monkeypatch):
    joined = []
    monkeypatch.setattr("rollout.worker_extension.join_weight_group", lambda *args: joined.append(args) or "comm")
    worker = StandInWorker(rank=1)
    worker.join_weight_group(b"id", first_rank=3, world_size=5)
    assert joined == [(b"id", 4, 5, worker.device)] and worker.weight_group == "comm"


class BroadcastEngine:
    """A rollout engine reduced to loading versions over NCCL; records what it was asked to load."""

    busy, ready_for_weights = False, True

    def __init__(self):
        self.weight_version, self.loaded = -1, []

    def apply_weight_broadcast(self, version, fingerprint_names, layout, timeout_s) -> dict[str, str]:
        self.loaded.append((version, fingerprint_names, layout))
        self.weight_version = version
        return {"w": f"print-{version}"}


def test_a_rollout_loads_each_header_through_the_broadcast_and_acknowledges_it():
    cfg = load_config(overrides=NCCL)
    worker = RolloutWorker(cfg, 0, "model")
    worker.engine = BroadcastEngine()
    sent = []

    async def send(message):
        sent.append(message)

    async def no_messages(**kwargs):
        await asyncio.sleep(0)

    worker.send, worker.handle_messages = send, no_messages
    updates = [make_update(v) for v in (0, 1)]
    try:
        for update in updates:
            worker.take_weights(update.header(), send)
        asyncio.run(worker.apply_updates())
    finally:
        worker.engine_thread.shutdown()
    layouts = [IncomingUpdate(u.header()).layout() for u in updates]
    assert worker.engine.loaded == [(u.version, sorted(u.fingerprint), layout) for u, layout in zip(updates, layouts)]
    assert [(m.version, m.fingerprint) for m in sent] == [(0, {"w": "print-0"}), (1, {"w": "print-1"})]


# --------------------------------------------------------------------------- the invitation


class JoiningEngine:
    """A rollout engine reduced to joining the weight group; records how it was asked to."""

    def __init__(self):
        self.joined = []

    def join_weight_group(self, group_id: bytes, first_rank: int, world_size: int) -> None:
        self.joined.append((group_id, first_rank, world_size))


class ScriptedLearner:
    """What a rollout hears from the learner before the group forms: the given messages, in order."""

    def __init__(self, messages):
        self.messages = list(messages)

    async def recv(self, timeout):
        if not self.messages:
            raise TimeoutError
        return types.SimpleNamespace(body=self.messages[0], kind=type(self.messages.pop(0)).KIND)


def invited_worker(messages, rollouts: int = 2, index: int = 1) -> RolloutWorker:
    cfg = load_config(overrides={**NCCL, "rollout.num_processes": str(rollouts), "transport.batch_timeout_s": "1"})
    worker = RolloutWorker(cfg, index, "model")
    worker.engine, worker.client = JoiningEngine(), ScriptedLearner(messages)
    return worker


def invite(first_rank: int, world_size: int, unique_id: bytes = bytes(range(128))) -> WeightGroupInvite:
    return WeightGroupInvite(unique_id=np.frombuffer(unique_id, dtype=np.uint8), first_rank=first_rank,
                             world_size=world_size)


def run_join(worker: RolloutWorker) -> None:
    try:
        asyncio.run(worker.join_weight_group())
    finally:
        worker.engine_thread.shutdown()


def test_a_rollout_joins_with_the_id_and_ranks_of_its_invitation_heartbeats_aside():
    worker = invited_worker([Heartbeat(state="idle"), invite(2, 3)])
    run_join(worker)
    assert worker.engine.joined == [(bytes(range(128)), 2, 3)]


def test_an_invitation_at_ranks_the_rollouts_config_does_not_give_it_is_refused_naming_the_options():
    worker = invited_worker([invite(1, 3)])  # index 1 of 2 rollouts: first rank 2
    with pytest.raises(ConfigError, match=r"first rank 1 of 3, its own config says 2 of 3.*rollout.num_processes"):
        run_join(worker)
    assert worker.engine.joined == []


def test_a_rollout_turned_away_instead_of_invited_stops_without_joining():
    worker = invited_worker([Shutdown(reason="refused: connected after the NCCL weight group formed")])
    run_join(worker)
    assert worker.stopped and worker.engine.joined == []


def test_no_invitation_times_out_naming_the_option():
    worker = invited_worker([])
    with pytest.raises(TimeoutError, match=r"no NCCL weight group invitation .* \(transport.batch_timeout_s\)"):
        run_join(worker)


def forged_invite(id_bytes: int, first_rank: int) -> list[bytes]:
    """A valid invitation's frames re-headed to carry an id of `id_bytes` bytes and `first_rank`."""
    frames = encode(invite(1, 2), run_id=RUN, producer_id="learner", seq=0, weight_version=-1)
    header = msgpack.unpackb(bytes(frames[0]), raw=False)
    header["body"]["first_rank"] = first_rank
    header["arrays"][0]["shape"] = [id_bytes]
    return [msgpack.packb(header, use_bin_type=True), bytes(id_bytes)]


@pytest.mark.parametrize("id_bytes, first_rank, problem", [
    (127, 1, "weight_group_invite.unique_id: 127 bytes, an NCCL unique id has 128"),
    (128, 2, "weight_group_invite.first_rank: 2 is not a rank of a group of world_size 2"),
])
def test_a_malformed_invitation_is_refused_on_decoding(id_bytes, first_rank, problem):
    decode(forged_invite(128, 1), expected_run_id=RUN)  # the forgery itself decodes when nothing is off
    with pytest.raises(ProtocolError, match=re.escape(problem)):
        decode(forged_invite(id_bytes, first_rank), expected_run_id=RUN)
