"""gRPC ingress as Ray Serve serves it, with a real grpcio client, on every backend.

One server per backend serves three applications for the whole module (each
test would otherwise pay for starting replicas): "main" (a Greeter calling a
Recorder downstream), "other", and "shed" (one slot, no queue). The ray backend
runs the tests that prove something the others cannot (a message crossing to an
actor and back, errors, cancellation reaching another actor).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

import tandem as serve
from conftest import BACKENDS, _start_ray_once
from grpc_helpers import (
    SERVICER,
    RayServeAPIClient,
    compile_user_proto,
    greeter_stub,
    pb,
    trailing,
)
from helpers import eventually, parse_prometheus, total, wait_for
from tandem._private.api import grpc_address, http_url
from tandem._private.calls.context import current_request
from tandem.grpc_util import RayServegRPCContext, gRPCInputStream
from tandem.handle import DeploymentHandle

MAIN = (("application", "main"),)


@serve.deployment
class Recorder:
    """Downstream of Greeter.Slow: records whether each call ran out or was cancelled."""

    def __init__(self) -> None:
        self.events: dict[str, list[str]] = {}

    async def slow(self, key: str, sleep_s: float) -> str:
        events = self.events.setdefault(key, [])
        events.append("started")
        try:
            await asyncio.sleep(sleep_s)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("finished")
        return "slept"

    def seen(self, key: str) -> list[str]:
        return list(self.events.get(key, []))


@serve.deployment
class Greeter:
    def __init__(self, recorder: DeploymentHandle) -> None:
        self.recorder = recorder

    def __call__(self, ask: Any) -> Any:
        return pb().Answer(greeting=f"Hello {ask.name}", num=ask.num * 2)

    def Streaming(self, ask: Any) -> Any:
        for i in range(ask.num):
            yield pb().Answer(greeting=f"{i}: {ask.name}", num=i)

    def Fail(self, ask: Any) -> Any:
        raise ValueError(f"no greeting for {ask.name}")

    async def FailStreaming(self, ask: Any) -> Any:
        yield pb().Answer(greeting="first")
        raise KeyError("second")

    async def Slow(self, ask: Any) -> Any:
        return pb().Answer(greeting=await self.recorder.slow.remote(ask.name, ask.sleep_s))

    async def Chat(self, asks: Any) -> Any:
        async for ask in asks:
            yield pb().Answer(greeting=f"hi {ask.name}", num=ask.num)

    async def Upload(self, asks: gRPCInputStream[Any]) -> Any:
        names, total = [], 0
        async for ask in asks:
            names.append(ask.name)
            total += ask.num
        return pb().Answer(greeting=",".join(names), num=total)

    def Status(self, ask: Any, grpc_context: RayServegRPCContext) -> Any:
        grpc_context.set_trailing_metadata([("who", "greeter")])
        if ask.name == "missing":
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"nothing called {ask.name}")
        sent = dict(grpc_context.invocation_metadata())
        return pb().Answer(greeting=f"{grpc_context.application()}|{sent.get('extra')}")

    async def StatusStreaming(self, ask: Any, grpc_context: RayServegRPCContext) -> Any:
        yield pb().Answer(greeting="first")
        grpc_context.set_code(grpc.StatusCode.ABORTED)
        grpc_context.set_details("stopped after one")

    def FailWithStatus(self, ask: Any, grpc_context: RayServegRPCContext) -> Any:
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        if ask.name:
            grpc_context.set_details(ask.name)
        raise ValueError("the method's own words")

    def Wrong(self, ask: Any) -> Any:
        return {"greeting": "not a message"}

    def Whoami(self, ask: Any) -> Any:
        request = current_request()
        assert request is not None
        model = serve.get_multiplexed_model_id()
        return pb().Answer(greeting=f"{request.request_id}|{model}|{type(ask).__name__}")


@serve.deployment
class Other:
    def __call__(self, ask: Any) -> Any:
        return pb().Answer(greeting=f"other {ask.name}")


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class OneSlot:
    """Holds its only slot until the file ``<name>.release`` exists."""

    async def __call__(self, ask: Any) -> Any:
        if ask.name:
            Path(ask.name + ".started").touch()
            while not Path(ask.name + ".release").exists():
                await asyncio.sleep(0.01)
        return pb().Answer(greeting="done")


@dataclass
class Served:
    backend: str
    stub: Any
    address: str
    recorder: DeploymentHandle[Any]


@pytest.fixture(autouse=True)
def _clean_tandem() -> Iterator[None]:
    """Overrides conftest's: the module's server (``served``) lives per backend."""
    yield


@pytest.fixture(
    scope="module",
    params=BACKENDS,
)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    backend = str(request.param)
    if backend == "ray":
        _start_ray_once()
    compile_user_proto(tmp_path_factory.mktemp("protos"))
    serve.start(
        http_options={"port": 0},
        grpc_options={"port": 0, "grpc_servicer_functions": [SERVICER]},
    )
    try:
        serve.run(Greeter.bind(Recorder.bind()), name="main", route_prefix="/main", backend=backend)
        serve.run(Other.bind(), name="other", route_prefix="/other", backend=backend)
        serve.run(OneSlot.bind(), name="shed", route_prefix="/shed", backend=backend)
        address = grpc_address()
        assert address is not None
        channel, stub = greeter_stub(address)
        recorder = serve.get_deployment_handle("Recorder", app_name="main")
        with channel:
            yield Served(backend, stub, address, recorder)
    finally:
        serve.shutdown()


def not_on_ray(served: Served) -> None:
    if served.backend == "ray":
        pytest.skip("the local and process backends prove this; ray adds nothing but time")


# -- requests and replies ---------------------------------------------------------


def test_unary_rpc_calls_the_method_of_its_name(served: Served) -> None:
    ask = pb().Ask(name="foo", num=30)
    reply, call = served.stub.__call__.with_call(
        ask, metadata=(*MAIN, ("request_id", "client-id-1"))
    )
    assert call.code() == grpc.StatusCode.OK
    assert (reply.greeting, reply.num) == ("Hello foo", 60)
    assert trailing(call)["request_id"] == "client-id-1"


def test_server_streaming_rpc_yields_each_reply(served: Served) -> None:
    replies = served.stub.Streaming(pb().Ask(name="s", num=4), metadata=MAIN)
    assert [(r.greeting, r.num) for r in replies] == [(f"{i}: s", i) for i in range(4)]


def test_request_reaches_the_method_as_its_message_with_id_and_model(served: Served) -> None:
    not_on_ray(served)
    reply, call = served.stub.Whoami.with_call(
        pb().Ask(), metadata=(*MAIN, ("request_id", "abc-1"), ("multiplexed_model_id", "m7"))
    )
    assert reply.greeting == "abc-1|m7|Ask"
    # An insane request_id (too long, or with spaces) is replaced by one of tandem's.
    reply, call = served.stub.Whoami.with_call(
        pb().Ask(), metadata=(*MAIN, ("request_id", "a b" * 100))
    )
    new_id = trailing(call)["request_id"]
    assert new_id != "a b" * 100 and reply.greeting.startswith(f"{new_id}|")


def test_priority_metadata_is_a_whole_number(served: Served) -> None:
    reply = served.stub.__call__(
        pb().Ask(name="p", num=1), metadata=(*MAIN, ("x-request-priority", "5"))
    )
    assert reply.greeting == "Hello p"
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.__call__(pb().Ask(), metadata=(*MAIN, ("x-request-priority", "urgent")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-request-priority must be a whole number" in str(caught.value.details())


# -- applications ----------------------------------------------------------------


def test_application_metadata_picks_the_application(served: Served) -> None:
    not_on_ray(served)
    other = served.stub.__call__(pb().Ask(name="x"), metadata=(("application", "other"),))
    assert other.greeting == "other x"
    for metadata, words in (
        ((("application", "nope"),), "Application 'nope' not found"),
        ((), "Application metadata not set"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.__call__(pb().Ask(), metadata=(*metadata, ("request_id", "r-404")))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert words in caught.value.details()
        assert "ListApplications" in caught.value.details()
        assert trailing(caught.value)["request_id"] == "r-404"


def test_ray_serve_api_service_lists_applications_and_answers_healthz(
    served: Served, tmp_path: Path
) -> None:
    not_on_ray(served)
    with grpc.insecure_channel(served.address) as channel:
        client = RayServeAPIClient(channel, tmp_path)
        listed = client.list_applications(client.messages["ListApplicationsRequest"]())
        assert sorted(listed.application_names) == ["main", "other", "shed"]
        health, call = client.healthz.with_call(client.messages["HealthzRequest"]())
        assert (health.message, call.code()) == ("success", grpc.StatusCode.OK)


# -- failures ---------------------------------------------------------------------


def test_exception_becomes_internal_with_its_message_only(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Fail(pb().Ask(name="bob"), metadata=(*MAIN, ("request_id", "r-fail")))
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "no greeting for bob"
    assert trailing(error)["request_id"] == "r-fail"
    # A stream that fails after its first reply ends with INTERNAL too, never a hang.
    replies = served.stub.FailStreaming(pb().Ask(), metadata=MAIN, timeout=30)
    assert next(replies).greeting == "first"
    with pytest.raises(grpc.RpcError) as caught:
        next(replies)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "Traceback" not in caught.value.details() and ".py" not in caught.value.details()
    assert served.stub.__call__(pb().Ask(name="after"), metadata=MAIN).greeting == "Hello after"


def test_a_reply_that_is_no_message_is_internal(served: Served) -> None:
    not_on_ray(served)
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Wrong(pb().Ask(), metadata=MAIN)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "returned a dict, not a protobuf message" in caught.value.details()


def test_bidirectional_rpc_reads_requests_as_it_replies(served: Served) -> None:
    # Each reply is read before the next request is sent: the method gets each request
    # as it comes, not once the client is done.
    requests: queue.Queue[Any] = queue.Queue()
    replies = served.stub.Chat(iter(requests.get, None), metadata=MAIN, timeout=30)
    for i in range(3):
        requests.put(pb().Ask(name=str(i), num=i))
        reply = next(replies)
        assert (reply.greeting, reply.num) == (f"hi {i}", i)
    requests.put(None)  # the client is done
    assert list(replies) == []


def test_client_streaming_gets_the_requests_as_they_come_and_answers_once(
    served: Served,
) -> None:
    asks = [pb().Ask(name=str(i), num=i) for i in range(200)]
    reply = served.stub.Upload(iter(asks), metadata=MAIN, timeout=30)
    assert reply.greeting == ",".join(str(i) for i in range(200))
    assert reply.num == sum(range(200))
    assert served.stub.Upload(iter([]), metadata=MAIN, timeout=30).num == 0


def test_grpc_context_reads_the_request_and_sets_status_and_trailers(served: Served) -> None:
    not_on_ray(served)
    metadata = (*MAIN, ("extra", "yes"))
    reply, call = served.stub.Status.with_call(pb().Ask(name="x"), metadata=metadata, timeout=10)
    assert reply.greeting == "main|yes"
    sent_back = trailing(call)
    assert sent_back["who"] == "greeter"
    assert sent_back["request_id"]  # tandem's, kept beside the method's own
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Status(pb().Ask(name="missing"), metadata=MAIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "nothing called missing"
    assert trailing(caught.value)["who"] == "greeter"  # an error keeps the method's trailers
    assert trailing(caught.value)["request_id"]
    replies = served.stub.StatusStreaming(pb().Ask(), metadata=MAIN, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        assert [r.greeting for r in replies] == ["first"]
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert caught.value.details() == "stopped after one"


def test_a_status_set_before_an_exception_is_what_the_client_gets(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.FailWithStatus(pb().Ask(name="bad name"), metadata=MAIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "bad name"
    with pytest.raises(grpc.RpcError) as caught:  # no details set: the exception's message
        served.stub.FailWithStatus(pb().Ask(), metadata=MAIN, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the method's own words"


def test_backpressure_is_resource_exhausted(served: Served, tmp_path: Path) -> None:
    not_on_ray(served)
    shed = (("application", "shed"),)
    key = str(tmp_path / "hold")
    holder = served.stub.__call__.future(pb().Ask(name=key), metadata=shed)
    try:
        assert wait_for(Path(key + ".started").exists, timeout_s=20)
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.__call__(pb().Ask(), metadata=(*shed, ("request_id", "r-shed")))
    finally:
        Path(key + ".release").touch()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later (request id r-shed)" in caught.value.details()
    assert holder.result(timeout=30).greeting == "done"
    assert served.stub.__call__(pb().Ask(), metadata=shed).greeting == "done"


# -- deadlines and cancellation reach every deployment ------------------------------


def test_client_deadline_is_deadline_exceeded_and_cancels_downstream(served: Served) -> None:
    not_on_ray(served)
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Slow(pb().Ask(name="deadline", sleep_s=30), metadata=MAIN, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    seen = eventually(
        lambda: served.recorder.seen.remote("deadline").result(timeout_s=10),
        lambda events: "cancelled" in events,
        timeout_s=10,
    )
    assert seen == ["started", "cancelled"]


def test_client_cancel_cancels_the_request_downstream(served: Served) -> None:
    future = served.stub.Slow.future(pb().Ask(name="cancel", sleep_s=30), metadata=MAIN)
    assert wait_for(
        lambda: served.recorder.seen.remote("cancel").result(timeout_s=10), timeout_s=20
    )
    future.cancel()
    seen = eventually(
        lambda: served.recorder.seen.remote("cancel").result(timeout_s=10),
        lambda events: "cancelled" in events,
        timeout_s=20,
    )
    assert seen == ["started", "cancelled"]
    assert served.stub.__call__(pb().Ask(name="on"), metadata=MAIN).greeting == "Hello on"


# -- metrics and the access log ----------------------------------------------------


def test_metrics_and_access_log_count_each_rpc(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    if served.backend != "local":
        pytest.skip("the proxy counts the same on every backend")
    caplog.set_level(logging.INFO, logger="tandem.access")
    served.stub.__call__(pb().Ask(), metadata=(*MAIN, ("request_id", "r-log-ok")))
    with pytest.raises(grpc.RpcError):
        served.stub.Fail(pb().Ask(), metadata=(*MAIN, ("request_id", "r-log-fail")))
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tandem.access"]
    [ok] = [line for line in lines if "r-log-ok" in line]
    [failed] = [line for line in lines if "r-log-fail" in line]
    assert ok.split()[:3] == ["GRPC", "/tandemtest.Greeter/__call__", "OK"], ok
    assert failed.split()[:3] == ["GRPC", "/tandemtest.Greeter/Fail", "INTERNAL"], failed
    url = http_url()
    assert url is not None
    samples = parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)
    labels = {"application": "main", "deployment": "Greeter"}
    call, fail = "/tandemtest.Greeter/__call__", "/tandemtest.Greeter/Fail"
    assert total(samples, "tandem_grpc_requests_total", **labels, method=call, status_code="OK")
    failures = total(
        samples, "tandem_grpc_requests_total", **labels, method=fail, status_code="INTERNAL"
    )
    assert failures >= 1
    errors = total(samples, "tandem_grpc_request_errors_total", **labels, error="server_error")
    assert errors >= failures
    assert total(samples, "tandem_grpc_request_latency_seconds_count", **labels, method=call)
    assert total(samples, "tandem_grpc_requests_in_flight", application="main") == 0


def test_many_rpcs_at_once_are_all_answered(served: Served) -> None:
    not_on_ray(served)
    replies: list[str] = []

    def call(i: int) -> None:
        replies.append(served.stub.__call__(pb().Ask(name=str(i)), metadata=MAIN).greeting)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(replies) == sorted(f"Hello {i}" for i in range(16))


def test_ray_serves_generated_client_modules_map_to_tandem(served: Served) -> None:
    not_on_ray(served)
    from tandem.generated.serve_pb2 import HealthzRequest, ListApplicationsRequest
    from tandem.generated.serve_pb2_grpc import RayServeAPIServiceStub

    with grpc.insecure_channel(served.address) as channel:
        stub = RayServeAPIServiceStub(channel)
        names = stub.ListApplications(ListApplicationsRequest(), timeout=10).application_names
        assert {"main", "other", "shed"} <= set(names)
        assert stub.Healthz(HealthzRequest(), timeout=10).message == "success"
