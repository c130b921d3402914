"""learner.data.reward_functions with several functions: weights and names from the config, dataset columns as
keyword arguments (by signature), async functions run concurrently on a loop of their own, the
HTTP reward server (a real local http.server) with its retries and errors, and which function and
sample a failure names."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import sys
import threading
import time

import pytest

from learner.data.reward_functions import (RewardFn, RewardFnError, RewardFunctions, RewardServer, RewardServerError,
                             score_functions)
from protocol.config import RewardConfig
from protocol.transport import free_tcp_port

PROMPTS, COMPLETIONS, LABELS = ["p0", "p1"], ["c0", "c1"], ["l0", None]


# ---------------------------------------------------------------------------- columns as keyword arguments


def test_a_function_gets_the_columns_it_names_or_all_with_kwargs():
    def named(prompts, completions, labels, solution):
        return [float(s) for s in solution]

    def other_names(p, c, l, **columns):  # `labels` is a column here, not its third argument
        return [float(len(columns))] * len(c)

    def kwargs(prompts, completions, labels, **columns):  # a `labels` column would fill `labels` twice
        return [float(len(columns))] * len(completions)

    def none(prompts, completions, labels):
        return [0.0] * len(completions)

    columns = {"solution": ["3", "4"], "labels": ["x", "y"], "meta": [{}, {}]}
    scores = score_functions([named, other_names, kwargs, none], PROMPTS, COMPLETIONS, LABELS, columns)
    assert scores == [[3.0, 4.0], [3.0, 3.0], [2.0, 2.0], [0.0, 0.0]]


def test_columns_must_have_one_value_per_completion():
    with pytest.raises(ValueError, match=r"equal lengths, got 2 completions and .*'solution': 1"):
        score_functions([lambda p, c, l: [0.0, 0.0]], PROMPTS, COMPLETIONS, LABELS, {"solution": ["3"]})


# ---------------------------------------------------------------------------- async functions


def test_async_functions_run_concurrently():
    """Each waits for the other to have started: called one after the other, the first would time out."""
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def waiting_for(me: str, other: str, value: float):
        async def fn(prompts, completions, labels):
            started[me].set()
            await asyncio.wait_for(started[other].wait(), timeout=5)
            return [value] * len(completions)
        return fn

    fns = [waiting_for("a", "b", 1.0), waiting_for("b", "a", 2.0), lambda p, c, l: [3.0, 3.0]]
    assert score_functions(fns, PROMPTS, COMPLETIONS, LABELS) == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_scoring_from_inside_a_running_event_loop():
    """The learner's own loop is not used (nor needed): a call from a coroutine, as from its worker threads, works."""
    async def double(prompts, completions, labels):
        await asyncio.sleep(0)
        return [2.0] * len(completions)

    async def learner():
        from_loop = score_functions([double], PROMPTS, COMPLETIONS, LABELS)
        from_thread = await asyncio.to_thread(score_functions, [double], PROMPTS, COMPLETIONS, LABELS)
        return from_loop, from_thread

    assert asyncio.run(learner()) == ([[2.0, 2.0]], [[2.0, 2.0]])


# ---------------------------------------------------------------------------- errors


def test_the_first_failing_function_is_named_with_the_sample():
    def fine(prompts, completions, labels):
        return [1.0, 1.0]

    def short(prompts, completions, labels):
        return [1.0]

    async def raising(prompts, completions, labels):
        raise KeyError("k")

    fns = [RewardFn(fine, "m:fine"), RewardFn(short, "m:short"), RewardFn(raising, "m:raising")]
    with pytest.raises(RewardFnError, match=r"^reward function m:short returned 1 rewards for 2 completions; "
                                            r"first missing index 1 \(completion: 'c1'\)$"):
        score_functions(fns, PROMPTS, COMPLETIONS, LABELS)
    with pytest.raises(RewardFnError, match=r"^reward function m:raising raised KeyError: 'k'$") as info:
        score_functions([fns[0], fns[2]], PROMPTS, COMPLETIONS, LABELS)
    assert isinstance(info.value.__cause__, KeyError)
    exiting = RewardFn(lambda p, c, l: sys.exit(3), "m:exiting")  # stops neither the scoring loop nor the caller
    with pytest.raises(RewardFnError, match=r"^reward function m:exiting raised SystemExit: 3$"):
        score_functions([exiting], PROMPTS, COMPLETIONS, LABELS)
    assert score_functions([fns[0]], PROMPTS, COMPLETIONS, LABELS) == [[1.0, 1.0]]
    nan = RewardFn(lambda p, c, l: [0.0, float("nan")], "m:nan")
    with pytest.raises(RewardFnError, match=r"^reward function m:nan returned non-finite reward nan at index 1 "
                                            r"\(completion: 'c1'\)$"):
        score_functions([fns[0], nan], PROMPTS, COMPLETIONS, LABELS)


# ---------------------------------------------------------------------------- from the config


def test_functions_and_weights_from_the_config(tmp_path):
    (tmp_path / "r.py").write_text("def score(p, c, l):\n    return [1.0] * len(c)\n"
                                   "class K:\n    @staticmethod\n    def score(p, c, l):\n"
                                   "        return [2.0] * len(c)\n")
    specs = [f"{tmp_path}/r.py:score", "learner.tasks.arithmetic:arithmetic_reward"]
    fns = RewardFunctions.from_config(RewardConfig(function=specs, url="http://127.0.0.1:1/", url_weight=3.0))
    assert fns.names == ["score", "arithmetic_reward", "url"] and fns.weights == [1.0, 1.0, 3.0]
    weighted = RewardFunctions.from_config(RewardConfig(function=specs, function_weights=[0.5, 2]))
    assert weighted.weights == [0.5, 2.0]
    with pytest.raises(RewardFnError, match=r"r\.py:score and .*r\.py:K\.score are both named 'score'"):
        RewardFunctions.from_config(RewardConfig(function=[specs[0], f"{tmp_path}/r.py:K.score"]))


# ---------------------------------------------------------------------------- the HTTP reward server


class Server:
    """A real http.server on 127.0.0.1 answering POSTs with `answers` in turn (the last one repeated)."""

    def __init__(self):
        self.answers: list[tuple[int, str, float]] = [(200, '{"rewards": []}', 0.0)]  # status, body, delay
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body, delay = server.answers[min(len(server.requests), len(server.answers)) - 1]
                time.sleep(delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out
                    self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_the_server_gets_the_batch_with_its_columns_and_its_rewards_are_checked(server):
    server.answers = [(200, '{"rewards": [0.5, 1]}', 0.0)]
    fns = RewardFunctions.from_config(RewardConfig(url=server.url))
    assert score_functions(fns.fns, PROMPTS, COMPLETIONS, LABELS, {"solution": ["3", "4"]}) == [[0.5, 1.0]]
    assert server.requests == [{"prompts": PROMPTS, "completions": COMPLETIONS, "labels": LABELS,
                                "solution": ["3", "4"]}]
    server.answers = [(200, '{"rewards": [0.5]}', 0.0)]
    with pytest.raises(RewardFnError, match=r"reward function reward\.url returned 1 rewards for 2 completions"):
        score_functions(fns.fns, PROMPTS, COMPLETIONS, LABELS)


def post(server: Server, retries: int = 2, timeout_s: float = 5.0) -> list:
    return asyncio.run(RewardServer(server.url, timeout_s, retries, backoff_s=0.01)(PROMPTS, COMPLETIONS, LABELS))


def test_a_server_error_is_retried_with_backoff(server):
    server.answers = [(503, "busy", 0.0), (500, "oops", 0.0), (200, '{"rewards": [1, 2]}', 0.0)]
    assert post(server) == [1, 2] and len(server.requests) == 3


def test_failures_name_the_url_the_status_and_the_body(server):
    server.answers = [(500, "x" * 300, 0.0)]
    with pytest.raises(RewardServerError) as info:
        post(server, retries=2)
    assert str(info.value) == f"reward server {server.url} answered status 500: {'x' * 200!r} (attempt 3 of 3)"
    assert len(server.requests) == 3
    server.requests.clear()
    server.answers = [(400, '{"error": "no prompts"}', 0.0)]  # the same request would get the same answer
    with pytest.raises(RewardServerError,
                       match=r"answered status 400: '\{\"error\": \"no prompts\"\}' \(attempt 1 of 3\)"):
        post(server)
    assert len(server.requests) == 1
    server.answers = [(200, '{"score": [1, 2]}', 0.0)]
    with pytest.raises(RewardServerError, match=r"answered status 200 without a JSON \{\"rewards\": \[\.\.\.\]\}: "
                                                 r"'\{\"score\": \[1, 2\]\}'"):
        post(server, retries=0)


def test_a_server_that_does_not_answer_in_time_or_at_all(server):
    server.answers = [(200, '{"rewards": [1, 2]}', 1.0)]
    with pytest.raises(RewardServerError, match=rf"^reward server {server.url} did not answer: .*timed out"):
        post(server, retries=0, timeout_s=0.2)
    closed = f"http://127.0.0.1:{free_tcp_port()}/"
    with pytest.raises(RewardServerError,
                       match=rf"^reward server {closed} did not answer: .*refused.* \(attempt 2 of 2\)"):
        asyncio.run(RewardServer(closed, 1.0, 1, backoff_s=0.01)(PROMPTS, COMPLETIONS, LABELS))
