"""A rollout process: one vLLM engine that turns work grants into packed batches, forever.

    python -m rollout --config run.yaml --index 0 [--section.key value ...]

It connects to the learner, says hello, then steps its engine until told to stop. Between two
engine steps it applies every weight update that has arrived (in flight: running requests go on
with the new weights and are tagged with both versions; with rollout.inflight_update finish the
update waits until they have finished, and new grants wait for it), submits every grant whose
minimum weight version it has reached (grants are generated together), and sends each finished
grant.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import sys
import time
import traceback

from protocol.config import (ConfigArgumentParser, ConfigError, RunConfig, check_inputs, check_weight_transfer_device,
                             config_from_args)
from protocol.errors import ProtocolError
from protocol.messages import (Heartbeat, Hello, RelayTarget, RolloutError, Shutdown, WeightAck, WeightBucket,
                               WeightGroupInvite, WeightHeader, WeightUpdate, WorkGrant)
from protocol.keys import CurveKeyError, client_keys_from_dir, server_keys_from_dir
from protocol.network_policy import check_transport_security, relay_bind_host
from protocol.transport import LearnerEndpoint, RolloutClient
from rollout.engine import VLLMGenerator, configure_cpu_threads, timed
from rollout.relay import RELAY_QUEUE, RelayLinks
from rollout.weight_stream import Credit, IncomingUpdate, UpdateAbandoned, WeightStreams

log = logging.getLogger("rollout")

# The exit status of a rollout that failed before saying hello to the learner: starting its engine,
# loading its model or keys, or its config. Launch scripts do not restart it (a restart would fail
# the same way) and stop the run at once instead of letting the learner wait for it.
EXIT_FAILED_BEFORE_HELLO = 3
USER_ERRORS = (ConfigError, CurveKeyError)  # reported as one line after the traceback


class RolloutWorker:
    def __init__(self, cfg: RunConfig, index: int, model_path: str):
        self.cfg = cfg
        self.index = index
        self.model_path = model_path
        self.producer_id = f"rollout-{index}@{socket.gethostname()}:{os.getpid()}"
        self.address = f"tcp://{cfg.transport.learner_host}:{cfg.transport.port}"
        self.grants: collections.deque[WorkGrant] = collections.deque()
        self.streams = WeightStreams()  # weight versions received (or arriving), not yet applied
        # The newest version applied since the last hello: the versions older than it that still come
        # are skipped. Not the engine's version: a resumed learner numbers its versions from its
        # checkpoint again, and after a hello its first one is loaded whatever its number.
        self.applied_since_hello = -1
        self.relayed = asyncio.Event()  # a relayed weight message came in: wakes the loop's wait for the learner
        self.stopped = False
        self.greeted = False  # its first hello has been sent
        self.last_heard = time.monotonic()
        # One sender at a time: sequence numbers must reach the learner in order.
        self.send_lock = asyncio.Lock()
        # Every engine call runs on this one thread: OpenMP's thread count and core binding are
        # per thread, and vLLM's CPU kernels fail when called from a thread other than the one
        # that set them up.
        self.engine_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def in_engine_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.engine_thread, fn, *args)

    async def run(self) -> None:
        await self.in_engine_thread(configure_cpu_threads, self.cfg.rollout, self.index)
        self.engine = await self.in_engine_thread(functools.partial(
            VLLMGenerator, self.model_path, self.cfg.rollout,
            seed=self.cfg.rollout.seed + 1000 * self.index, trust_remote_code=self.cfg.model.trust_remote_code))
        try:
            await self.serve()
        finally:
            await self.in_engine_thread(self.engine.close)
            self.engine_thread.shutdown()

    async def serve(self) -> None:
        t = self.cfg.transport
        curve = client_keys_from_dir(t.curve_dir, f"rollout-{self.index}") if t.curve_dir else None
        async with RolloutClient(self.address, producer_id=self.producer_id, run_id=self.cfg.run_id,
                                 curve=curve) as client:
            self.client = client
            relays = t.weight_transfer == "zmq" and t.weight_relay_fanout  # nccl: rank 0 broadcasts to every worker
            self.streams = WeightStreams(self.relay_links() if relays else None,
                                         parked=lambda: not self.engine.ready_for_weights)
            await self.send(self.hello())
            self.greeted = True
            self.last_heard = time.monotonic()  # the learner's silence counts from here, not from engine start
            tasks = [asyncio.create_task(self.heartbeats())]
            if self.streams.links is not None:
                tasks.append(asyncio.create_task(self.relayed_weights()))
            try:
                if t.weight_transfer == "nccl":
                    await self.join_weight_group()
                await self.continuous_rollouts()
            except Exception as exc:
                await self.send(RolloutError(message=f"{type(exc).__name__}: {exc}", fatal=True))
                raise
            finally:
                for task in tasks:
                    task.cancel()
                if self.streams.links is not None:
                    self.streams.links.close()

    async def join_weight_group(self) -> None:
        """Have the engine's workers join the NCCL weight group (transport.weight_transfer nccl) the learner
        invites this rollout into; returns once the learner and every other rollout have joined too (or at
        once when the learner turned this rollout away). Heartbeats go on meanwhile."""
        invite = await self.weight_group_invite()
        if invite is None:
            return
        expected = (self.cfg.nccl_first_rank(self.index), self.cfg.nccl_world_size())
        if (invite.first_rank, invite.world_size) != expected:
            raise ConfigError(f"the learner invites rollout {self.index} into the NCCL weight group at first rank "
                              f"{invite.first_rank} of {invite.world_size}, its own config says {expected[0]} of "
                              f"{expected[1]}: start the learner and the rollouts with the same rollout.num_processes "
                              f"and rollout.tensor_parallel_size")
        log.info("%s: joining the NCCL weight group as ranks %d..%d of %d", self.producer_id, invite.first_rank,
                 invite.first_rank + self.cfg.rollout.tensor_parallel_size - 1, invite.world_size)
        await self.in_engine_thread(self.engine.join_weight_group, invite.unique_id.tobytes(), invite.first_rank,
                                    invite.world_size)

    async def weight_group_invite(self) -> WeightGroupInvite | None:
        """The learner's answer to this rollout's hello under weight_transfer nccl: its invitation into the
        group, or None when it told this rollout to stop instead."""
        timeout = self.cfg.transport.batch_timeout_s
        while True:
            try:
                envelope = await self.client.recv(timeout=timeout)
            except TimeoutError:
                raise TimeoutError(f"no NCCL weight group invitation from the learner within {timeout:g} s "
                                   f"(transport.batch_timeout_s) after this rollout's hello") from None
            self.last_heard = time.monotonic()
            message = envelope.body
            if isinstance(message, WeightGroupInvite):
                return message
            if isinstance(message, Shutdown):
                await self.on_learner_message(message, envelope.kind)
                if self.stopped:
                    return None
            if not isinstance(message, Heartbeat):
                raise RuntimeError(f"expected the learner's NCCL weight group invitation, got a {envelope.kind} message")

    def relay_links(self) -> RelayLinks:
        """This rollout's relay socket (on transport.relay_host, CURVE as the learner's socket) and how it
        reaches its relay children."""
        t, name = self.cfg.transport, f"rollout-{self.index}"
        inbox = LearnerEndpoint(self.cfg.run_id, host=relay_bind_host(t), port=0, producer_id=self.producer_id,
                                limits=self.client.limits, rcvhwm=RELAY_QUEUE,
                                curve=server_keys_from_dir(t.curve_dir, name) if t.curve_dir else None)

        def connect(target: RelayTarget) -> RolloutClient:
            keys = client_keys_from_dir(t.curve_dir, name, server_name=target.key_name) if t.curve_dir else None
            return RolloutClient(target.address, self.cfg.run_id, self.producer_id, limits=self.client.limits,
                                 sndhwm=RELAY_QUEUE, curve=keys)

        return RelayLinks(inbox, connect, t.weight_ack_timeout_s)

    async def relayed_weights(self) -> None:
        """Take in the weight versions relayed by other rollouts, as they come."""
        while True:
            parent, envelope = await self.streams.links.inbox.recv()
            self.take_weights(envelope.body, self.streams.links.credit_to(parent))
            del envelope  # a bucket's memory goes once it has been let go of, not when the next message comes
            self.relayed.set()

    async def continuous_rollouts(self) -> None:
        while not self.stopped:
            idle = not self.engine.busy and not self.update_waiting() and self.runnable_grant() is None
            await self.handle_messages(block=idle)
            await self.apply_updates()  # between two engine steps
            while not self.stopped and (grant := self.runnable_grant()) is not None:
                self.grants.remove(grant)
                self.engine.submit(grant)
            if self.engine.busy and not self.stopped:
                for batch in await self.in_engine_thread(self.engine.step):
                    await self.send(batch)

    async def heartbeats(self) -> None:
        """Keep the learner informed that this process is alive, also during long generations."""
        while True:
            await asyncio.sleep(self.cfg.transport.heartbeat_s)
            await self.send(Heartbeat(state="generating" if self.engine.busy else "idle"))

    def runnable_grant(self) -> WorkGrant | None:
        """The oldest grant this engine's weights are recent enough for; none while an update waits
        for the running requests to finish (inflight_update finish), so that they can."""
        if self.update_waiting():
            return None
        return next((g for g in self.grants if g.min_weight_version <= self.engine.weight_version), None)

    def update_waiting(self) -> bool:
        return self.streams.next_update(self.applied_since_hello) is not None

    async def handle_messages(self, *, block: bool, timeout: float | None = None) -> None:
        """Handle every message already waiting; when `block`, wait for at least one (up to `timeout`,
        by default transport.heartbeat_s)."""
        timeout = (timeout or self.cfg.transport.heartbeat_s) if block else 0.0
        while not self.stopped:
            try:
                envelope = await self.next_from_learner(timeout)
            except TimeoutError:
                silent = time.monotonic() - self.last_heard
                if silent > self.cfg.transport.peer_timeout_s:
                    await self.learner_lost(silent)
                return
            self.last_heard = time.monotonic()
            await self.on_learner_message(envelope.body, envelope.kind)
            del envelope  # a bucket's memory goes once it has been let go of, not when the next message comes
            timeout = 0.0

    async def on_learner_message(self, message, kind: str) -> None:
        """Work, weights, a heartbeat or a shutdown from the learner (`kind`: the envelope's, named in a warning)."""
        if isinstance(message, WorkGrant):
            self.grants.append(message)
        elif isinstance(message, (WeightUpdate, WeightHeader, WeightBucket)):
            self.take_weights(message, self.send)
        elif isinstance(message, Heartbeat):
            pass
        elif isinstance(message, Shutdown) and message.rejoin:
            await self.rejoin(f"the learner dropped this rollout ({message.reason})")
        elif isinstance(message, Shutdown):
            log.info("%s: shutdown requested (%s)", self.producer_id, message.reason)
            self.stopped = True
        else:
            log.warning("%s: ignoring unexpected %s message", self.producer_id, kind)

    async def next_from_learner(self, timeout: float):
        """The learner's next message within `timeout` (TimeoutError), or TimeoutError as soon as a
        relayed weight message comes in: the loop then goes on to load it."""
        if not timeout or self.streams.links is None:
            return await self.client.recv(timeout=timeout)
        self.relayed.clear()
        receiving = asyncio.ensure_future(self.client.recv(timeout=timeout))
        relayed = asyncio.ensure_future(self.relayed.wait())
        await asyncio.wait({receiving, relayed}, return_when=asyncio.FIRST_COMPLETED)
        relayed.cancel()
        if not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            raise TimeoutError("a relayed weight message came in")
        return receiving.result()

    def take_weights(self, message: WeightUpdate | WeightHeader | WeightBucket, credit: Credit) -> None:
        """A weight version, or a piece of one: relayed on, kept for the engine (rollout.weight_stream);
        `credit` credits a streamed bucket's sender once this rollout has let go of it."""
        applied = self.applied_since_hello
        try:
            if isinstance(message, WeightUpdate):
                self.streams.on_whole(message, applied)
            elif isinstance(message, WeightHeader):
                self.streams.on_header(message, applied)
            else:
                self.streams.on_bucket(message, credit)
        except ProtocolError as exc:
            log.warning("%s: discarded a %s: %s", self.producer_id, type(message).__name__, exc)

    async def apply_updates(self) -> None:
        """Apply the received weight versions in order and acknowledge each, as far as the engine
        takes them now (see VLLMGenerator.ready_for_weights). A streamed version is loaded while its
        buckets arrive: messages are handled meanwhile, so that they reach it."""
        # Twice the learner's deadline: a version cut off by a stuck relay parent is sent again by the
        # learner once it drops that parent (after weight_ack_timeout_s), and fills in the missing buckets.
        timeout = 2 * self.cfg.transport.weight_ack_timeout_s
        while (update := self.streams.next_update(self.applied_since_hello)) and self.engine.ready_for_weights:
            applying = asyncio.ensure_future(self.in_engine_thread(timed, *self.weight_loader(update, timeout)))
            while not update.complete and not applying.done():
                await self.handle_messages(block=True, timeout=0.02)
                if self.stopped:
                    update.abandon()
                    break
            try:
                fingerprint, seconds = await applying
            except UpdateAbandoned:
                return  # rejoining or stopping
            except TimeoutError as exc:  # the rest of the version never came: start again from the latest
                if self.cfg.transport.weight_transfer == "nccl":
                    raise  # an NCCL group cannot recover a broadcast: nothing to rejoin
                await self.rejoin(f"weight version {update.version} stalled ({exc})")
                return
            self.streams.done(update.version)
            self.applied_since_hello = update.version
            await self.send(WeightAck(version=update.version, fingerprint=fingerprint, apply_seconds=seconds))

    def weight_loader(self, update: IncomingUpdate, timeout: float) -> tuple:
        """The engine call that loads `update`, and its arguments: its workers receive it over NCCL
        (transport.weight_transfer nccl), or it is fed the buckets that come over ZeroMQ."""
        names = sorted(update.header.fingerprint)
        if self.cfg.transport.weight_transfer == "nccl":
            return self.engine.apply_weight_broadcast, update.version, names, update.layout(), timeout
        return (self.engine.apply_weight_stream, update.version, names, update.tensors(timeout),
                self.cfg.transport.weight_dir, timeout)

    async def learner_lost(self, silent: float) -> None:
        """The learner has been silent too long: give up, or wait for a resumed one (rollout.on_learner_lost)."""
        lost = f"no message from the learner at {self.address} for {silent:.0f} s (transport.peer_timeout_s)"
        if self.cfg.rollout.on_learner_lost == "exit":
            raise TimeoutError(f"{lost}; giving up")
        await self.rejoin(f"{lost} (rollout.on_learner_lost=wait)")

    async def rejoin(self, why: str) -> None:
        """Abandon every grant and say hello again. A resumed learner plans its own work (recorded
        batches answer what it already had), one that dropped us re-issued ours; either sends its
        current weights on hello, so the engine stays loaded and catches up."""
        self.streams.abandon_all()
        self.applied_since_hello = -1
        cancelled = await self.in_engine_thread(self.engine.cancel_all)
        log.warning("%s; dropping %d grant(s) (%d generating) and saying hello again",
                    why, len(self.grants) + cancelled, cancelled)
        self.grants.clear()
        self.last_heard = time.monotonic()
        await self.send(self.hello())

    def hello(self) -> Hello:
        info = {"index": self.index, "model": self.model_path, "pid": os.getpid()}
        if self.streams.links is not None:
            info["relay_address"] = self.streams.links.address  # the learner relays weights through it
        return Hello(engine_info=info)

    async def send(self, message) -> None:
        async with self.send_lock:
            await self.client.send(message, weight_version=self.engine.weight_version)


def check_nccl_member(cfg: RunConfig, index: int) -> None:
    """With transport.weight_transfer nccl: this rollout's own CUDA device, and an index that names its place
    in the NCCL weight group."""
    if cfg.transport.weight_transfer != "nccl":
        return
    import torch  # (the engine loads it anyway)

    check_weight_transfer_device(cfg, "rollout", torch.cuda.is_available())
    if not 0 <= index < cfg.rollout.num_processes:
        raise ConfigError(f"transport.weight_transfer nccl: --index {index} has no place in the NCCL weight group of "
                          f"rollout.num_processes {cfg.rollout.num_processes} rollouts (indexes 0.."
                          f"{cfg.rollout.num_processes - 1})")


def main(argv: list[str] | None = None) -> int:
    parser = ConfigArgumentParser(prog="python -m rollout", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=int, default=0, help="This rollout process's index (default: 0).")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_transport_security(cfg)
        if not cfg.run_id or not cfg.transport.port:
            raise ConfigError("--run_id and --transport.port are required (the launcher passes the learner's)")
        if not cfg.model.path:
            raise ConfigError("--model.path is required (launch scripts pass the prepared model)")
        check_inputs(cfg, "rollout")
        check_nccl_member(cfg, args.index)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED_BEFORE_HELLO
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rollout-{args.index} %(levelname)s %(message)s")
    start = time.perf_counter()
    worker = RolloutWorker(cfg, args.index, cfg.model.path)
    try:
        asyncio.run(worker.run())
    except Exception as exc:
        traceback.print_exc()  # into the log (launch scripts send a rollout's output there)
        if isinstance(exc, USER_ERRORS):
            print(f"error: {exc}", file=sys.stderr)
        return 1 if worker.greeted else EXIT_FAILED_BEFORE_HELLO
    log.info("rollout %d finished after %.1f s", args.index, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
