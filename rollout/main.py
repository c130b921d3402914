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
import functools
import logging
import os
import socket
import sys
import time
import traceback

from protocol.config import ConfigArgumentParser, ConfigError, RunConfig, check_inputs, config_from_args
from protocol.messages import (Heartbeat, Hello, RolloutError, Shutdown, WeightAck, WeightUpdate,
                               WorkGrant)
from protocol.keys import CurveKeyError, client_keys_from_dir
from protocol.network_policy import check_transport_security
from protocol.transport import RolloutClient
from rollout.engine import VLLMGenerator, configure_cpu_threads, timed

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
        self.updates: collections.deque[WeightUpdate] = collections.deque()  # received, not yet applied
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
            await self.send(self.hello())
            self.greeted = True
            self.last_heard = time.monotonic()  # the learner's silence counts from here, not from engine start
            beating = asyncio.create_task(self.heartbeats())
            try:
                await self.continuous_rollouts()
            except Exception as exc:
                await self.send(RolloutError(message=f"{type(exc).__name__}: {exc}", fatal=True))
                raise
            finally:
                beating.cancel()

    async def continuous_rollouts(self) -> None:
        while not self.stopped:
            idle = not self.engine.busy and not self.updates and self.runnable_grant() is None
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
        if self.updates:
            return None
        return next((g for g in self.grants if g.min_weight_version <= self.engine.weight_version), None)

    async def handle_messages(self, *, block: bool) -> None:
        """Handle every message already waiting; when `block`, wait for at least one."""
        timeout = self.cfg.transport.heartbeat_s if block else 0.0
        while not self.stopped:
            try:
                envelope = await self.client.recv(timeout=timeout)
            except TimeoutError:
                silent = time.monotonic() - self.last_heard
                if silent > self.cfg.transport.peer_timeout_s:
                    await self.learner_lost(silent)
                return
            self.last_heard = time.monotonic()
            message = envelope.body
            if isinstance(message, WorkGrant):
                self.grants.append(message)
            elif isinstance(message, WeightUpdate):
                self.updates.append(message)
            elif isinstance(message, Heartbeat):
                pass
            elif isinstance(message, Shutdown) and message.rejoin:
                await self.rejoin(f"the learner dropped this rollout ({message.reason})")
            elif isinstance(message, Shutdown):
                log.info("%s: shutdown requested (%s)", self.producer_id, message.reason)
                self.stopped = True
            else:
                log.warning("%s: ignoring unexpected %s message", self.producer_id, envelope.kind)
            timeout = 0.0

    async def apply_updates(self) -> None:
        """Apply the received weight updates in order and acknowledge each, as far as the engine
        takes them now (see VLLMGenerator.ready_for_weights)."""
        while self.updates and self.engine.ready_for_weights:
            update = self.updates.popleft()
            fingerprint, seconds = await self.in_engine_thread(
                timed, self.engine.apply_weights, update, self.cfg.transport.weight_dir,
                self.cfg.transport.weight_ack_timeout_s)
            await self.send(WeightAck(version=update.version, fingerprint=fingerprint, apply_seconds=seconds))

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
        cancelled = await self.in_engine_thread(self.engine.cancel_all)
        log.warning("%s; dropping %d grant(s) (%d generating) and saying hello again",
                    why, len(self.grants) + cancelled, cancelled)
        self.grants.clear()
        self.last_heard = time.monotonic()
        await self.send(self.hello())

    def hello(self) -> Hello:
        return Hello(engine_info={"index": self.index, "model": self.model_path, "pid": os.getpid()})

    async def send(self, message) -> None:
        async with self.send_lock:
            await self.client.send(message, weight_version=self.engine.weight_version)


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
