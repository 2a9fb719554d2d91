"""The HTTP side, as a client sees it: the proxy in front of applications run in this process.

Every test runs its applications with ``tandem.run`` (the conftest binds the
server to a free port) and talks to them with httpx over a real socket.
No ``from __future__ import annotations`` here, on purpose: a test below
checks that a user module with postponed annotations works too.
"""

import asyncio
import functools
import logging
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

import tandem as serve
from helpers import eventually, parse_prometheus
from helpers import total as count
from tandem._private.api import http_url
from tandem.handle import DeploymentHandle


def url(path: str = "/") -> str:
    base = http_url()
    assert base is not None, "no HTTP server runs after serve.run(app) with a route_prefix"
    return base + path


def client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(timeout=kwargs.pop("timeout", 10.0), **kwargs)


# -- the seed's hello application ------------------------------------------


@serve.deployment
class LanguageClassifier:
    def __init__(self, spanish: DeploymentHandle, french: DeploymentHandle) -> None:
        self.spanish = spanish
        self.french = french

    async def __call__(self, http_request: Request) -> str:
        request = await http_request.json()
        language, name = request["language"], request["name"]
        if language == "spanish":
            return await self.spanish.say_hello.remote(name)
        if language == "french":
            return await self.french.say_hello.remote(name)
        return "Please try again."


@serve.deployment
class SpanishResponder:
    def say_hello(self, name: str) -> str:
        return f"Hola {name}"


@serve.deployment
class FrenchResponder:
    def say_hello(self, name: str) -> str:
        return f"Bonjour {name}"


def test_hello_seed_app_answers_over_http(backend: str) -> None:
    app = LanguageClassifier.bind(SpanishResponder.bind(), FrenchResponder.bind())
    serve.run(app, backend=backend)
    with client() as c:
        r = c.post(url("/"), json={"language": "spanish", "name": "Dora"})
        assert r.status_code == 200
        assert r.text == "Hola Dora"
        assert r.headers["content-type"].startswith("text/plain")
        assert c.post(url("/"), json={"language": "french", "name": "Dora"}).text == "Bonjour Dora"
        assert c.post(url("/"), json={"language": "german", "name": "Dora"}).text == (
            "Please try again."
        )


# -- return values become responses ----------------------------------------


class Point(BaseModel):
    x: int
    y: float


RETURNS: dict[str, Any] = {
    "str": lambda: "héllo",
    "bytes": lambda: b"\x00\x01\xffraw",
    "dict": lambda: {"a": 1, "b": [1, 2], "c": None},
    "list": lambda: [1, "two", 3.5],
    "int": lambda: 42,
    "float": lambda: 2.5,
    "bool": lambda: True,
    "none": lambda: None,
    "pydantic": lambda: Point(x=1, y=2.5),
    "json_response": lambda: JSONResponse(
        {"made": "here"}, status_code=201, headers={"x-mine": "1"}
    ),
    "html": lambda: HTMLResponse("<b>hi</b>"),
    "teapot": lambda: PlainTextResponse("short and stout", status_code=418),
}


@serve.deployment
class Returns:
    async def __call__(self, request: Request) -> Any:
        return RETURNS[request.query_params["kind"]]()


@pytest.mark.parametrize(
    ("kind", "status", "content_type", "check"),
    [
        ("str", 200, "text/plain", lambda r: r.text == "héllo"),
        ("bytes", 200, "application/octet-stream", lambda r: r.content == b"\x00\x01\xffraw"),
        ("dict", 200, "application/json", lambda r: r.json() == {"a": 1, "b": [1, 2], "c": None}),
        ("list", 200, "application/json", lambda r: r.json() == [1, "two", 3.5]),
        ("int", 200, "application/json", lambda r: r.json() == 42),
        ("float", 200, "application/json", lambda r: r.json() == 2.5),
        ("bool", 200, "application/json", lambda r: r.json() is True),
        ("none", 200, "application/json", lambda r: r.json() is None),
        ("pydantic", 200, "application/json", lambda r: r.json() == {"x": 1, "y": 2.5}),
        (
            "json_response",
            201,
            "application/json",
            lambda r: r.json() == {"made": "here"} and r.headers["x-mine"] == "1",
        ),
        ("html", 200, "text/html", lambda r: r.text == "<b>hi</b>"),
        ("teapot", 418, "text/plain", lambda r: r.text == "short and stout"),
    ],
)
def test_return_value_becomes_response(
    backend: str, kind: str, status: int, content_type: str, check: Any
) -> None:
    serve.run(Returns.bind(), backend=backend)
    with client() as c:
        r = c.get(url("/"), params={"kind": kind})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].split(";")[0] == content_type
    assert check(r), (r.headers, r.content)
    assert r.headers.get("x-request-id")


# -- the request reaches __call__ whole ----------------------------------------


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path"),
            "query": sorted(request.query_params.multi_items()),
            "header": request.headers.get("x-custom"),
            "content_type": request.headers.get("content-type"),
            "body": body.decode(),
            "json": await request.json() if body.startswith(b"{") else None,
        }


def test_headers_query_and_body_reach_the_request(backend: str) -> None:
    serve.run(Echo.bind(), route_prefix="/echo", backend=backend)
    big = "x" * 300_000  # more than one ASGI body message
    with client() as c:
        r = c.put(
            url("/echo/sub/path"),
            params=[("a", "1"), ("a", "2"), ("b", "é")],
            headers={"X-Custom": "yes"},
            json={"payload": big},
        )
    assert r.status_code == 200, r.text
    seen = r.json()
    assert seen["method"] == "PUT"
    assert seen["path"] == "/echo/sub/path"
    assert seen["root_path"] == "/echo"
    assert seen["query"] == [["a", "1"], ["a", "2"], ["b", "é"]]
    assert seen["header"] == "yes"
    assert seen["content_type"] == "application/json"
    assert seen["json"] == {"payload": big}


@serve.deployment
class BodyReader:
    """Reads the body the way ``?how=`` says; keeps what background tasks did."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def __call__(self, request: Request) -> Any:
        how = request.query_params["how"]
        if how == "twice":
            return (await request.body() + await request.body()).decode()
        if how == "json":
            return await request.json()
        if how == "json_then_body":
            return {"json": await request.json(), "body": (await request.body()).decode()}
        if how == "stream":
            return b"".join([chunk async for chunk in request.stream()]).decode()
        assert how == "background"
        body = (await request.body()).decode()
        return PlainTextResponse("later", background=BackgroundTask(self.done.append, body))

    def seen(self) -> list[str]:
        return list(self.done)


def test_the_body_reads_every_way_and_a_background_task_runs(backend: str) -> None:
    handle = serve.run(BodyReader.bind(), backend=backend)
    with client() as c:
        assert c.post(url("/?how=twice"), content=b"ab").text == "abab"
        assert c.post(url("/?how=json"), json={"x": [1, 2]}).json() == {"x": [1, 2]}
        both = c.post(url("/?how=json_then_body"), content=b'{"a": 1}').json()
        assert both == {"json": {"a": 1}, "body": '{"a": 1}'}
        assert c.post(url("/?how=stream"), content=b"x" * 70_000).text == "x" * 70_000
        answer = c.post(url("/?how=background"), content=b"task")
    assert (answer.status_code, answer.text) == (200, "later")
    assert eventually(lambda: handle.seen.remote().result(timeout_s=5), bool) == ["task"]

    # Every kind of answer gave its replica back.
    def in_flight() -> int:
        replicas = serve.status().applications["default"].deployments["BodyReader"].replicas
        return sum(r.in_flight or 0 for r in replicas)

    assert eventually(in_flight, lambda n: n == 0) == 0


@serve.deployment
class SyncIngress:
    def __call__(self, request: Request) -> dict[str, Any]:
        return {"path": request.url.path, "query": dict(request.query_params)}


def test_sync_call_and_many_concurrent_requests(backend: str) -> None:
    serve.run(SyncIngress.bind(), route_prefix="/sync/", backend=backend)  # trailing / ignored

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(
                *(c.get(url("/sync/x"), params={"i": i}) for i in range(100))
            )

    responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * 100
    assert [r.json() for r in responses] == [
        {"path": "/sync/x", "query": {"i": str(i)}} for i in range(100)
    ]
    assert len({r.headers["x-request-id"] for r in responses}) == 100


# -- routing by prefix -------------------------------------------------------


@serve.deployment
class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, request: Request) -> str:
        return f"{self.name} {request.url.path}"


def test_longest_route_prefix_wins(backend: str) -> None:
    serve.run(Named.bind("root"), name="root", route_prefix="/", backend=backend)
    serve.run(Named.bind("api"), name="api", route_prefix="/api", backend=backend)
    with client() as c:
        assert c.get(url("/")).text == "root /"
        assert c.get(url("/other/x")).text == "root /other/x"
        assert c.get(url("/api")).text == "api /api"
        assert c.get(url("/api/")).text == "api /api/"
        assert c.get(url("/api/v1/x")).text == "api /api/v1/x"
        assert c.get(url("/apix")).text == "root /apix"


def test_path_no_application_serves_is_404(backend: str) -> None:
    serve.run(Named.bind("api"), name="api", route_prefix="/api", backend=backend)
    with client() as c:
        assert c.get(url("/api/ok")).status_code == 200
        for path in ("/", "/apix", "/other/api"):
            r = c.get(url(path))
            assert r.status_code == 404, (path, r.text)
            assert r.headers["x-request-id"]
        assert c.get(url("/api")).text == "api /api"


def test_deleted_application_stops_being_served(backend: str) -> None:
    serve.run(Named.bind("root"), name="root", route_prefix="/", backend=backend)
    serve.run(Named.bind("api"), name="api", route_prefix="/api", backend=backend)
    serve.delete("api")
    with client() as c:
        assert c.get(url("/api/x")).text == "root /api/x"
        serve.delete("root")
        assert c.get(url("/api/x")).status_code == 404


# -- errors in user code -------------------------------------------------------


@serve.deployment
class Fails:
    async def __call__(self, request: Request) -> str:
        if request.query_params.get("fail"):
            raise ValueError("boom from user code")
        return "fine"


def test_exception_is_500_with_request_id_and_server_keeps_serving(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tandem.proxy")
    serve.run(Fails.bind(), backend=backend)
    with client() as c:
        r = c.get(url("/"), params={"fail": "1"})
        assert r.status_code == 500
        request_id = r.headers["x-request-id"]
        assert request_id
        assert request_id in r.text
        assert "boom" not in r.text  # the traceback is for the log, not for clients

        ok = c.get(url("/"))
        assert ok.status_code == 200 and ok.text == "fine"
        assert ok.headers["x-request-id"] != request_id

    errors = [
        rec for rec in caplog.records if rec.name == "tandem.proxy" and rec.levelno >= logging.ERROR
    ]
    assert errors, caplog.text
    logged = "\n".join(
        rec.getMessage()
        + "\n"
        + (logging.Formatter().formatException(rec.exc_info) if rec.exc_info else "")
        for rec in errors
    )
    assert request_id in logged
    assert "Traceback" in logged and "ValueError" in logged and "boom from user code" in logged


def test_client_request_id_is_kept(backend: str) -> None:
    serve.run(Fails.bind(), backend=backend)
    with client() as c:
        r = c.get(url("/"), params={"fail": "1"}, headers={"X-Request-Id": "my-id-123"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "my-id-123"
    assert "my-id-123" in r.text


class CustomError(Exception):
    pass


@serve.deployment
class Flaky:
    def divide(self, n: int) -> float:
        return 1 / n

    async def lookup(self, key: str) -> str:
        return {"a": "A"}[key]

    def custom(self) -> None:
        raise CustomError("not an HTTP error")


@serve.deployment
class FlakyFront:
    def __init__(self, flaky: DeploymentHandle) -> None:
        self.flaky = flaky

    async def __call__(self, request: Request) -> Any:
        what = request.query_params["what"]
        if what == "divide":
            return await self.flaky.divide.remote(int(request.query_params["n"]))
        if what == "lookup":
            return await self.flaky.lookup.remote(request.query_params["key"])
        if what == "custom":
            return await self.flaky.custom.remote()
        if what == "unserializable":
            return object()
        return "ok"


def test_errors_in_downstream_methods_do_not_kill_the_server(backend: str) -> None:
    serve.run(FlakyFront.bind(Flaky.bind()), backend=backend)
    with client() as c:
        for params in (
            {"what": "divide", "n": "0"},
            {"what": "lookup", "key": "zzz"},
            {"what": "custom"},
            {"what": "unserializable"},
        ):
            r = c.get(url("/"), params=params)
            assert r.status_code == 500, (params, r.text)
            assert r.headers["x-request-id"] in r.text
            assert c.get(url("/"), params={"what": "ok"}).text == "ok"
        assert c.get(url("/"), params={"what": "divide", "n": "4"}).json() == 0.25
        assert c.get(url("/"), params={"what": "lookup", "key": "a"}).text == "A"
        assert c.get(url("/-/healthz")).status_code == 200
    status = serve.status().applications["default"]
    assert status.status == "RUNNING"


# -- streaming -------------------------------------------------------------


@serve.deployment
class Streamer:
    async def __call__(self, request: Request) -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(4):
                if i:
                    await asyncio.sleep(0.3)
                yield f"chunk{i};"

        return StreamingResponse(chunks(), media_type="text/plain")


def test_streaming_response_arrives_chunk_by_chunk(backend: str) -> None:
    serve.run(Streamer.bind(), backend=backend)
    with client() as c:
        started = time.perf_counter()
        with c.stream("GET", url("/")) as r:
            assert r.status_code == 200
            arrivals = [(time.perf_counter() - started, chunk) for chunk in r.iter_raw() if chunk]
    assert b"".join(chunk for _, chunk in arrivals) == b"chunk0;chunk1;chunk2;chunk3;"
    assert len(arrivals) >= 3, arrivals
    first, last = arrivals[0][0], arrivals[-1][0]
    # The generator needs 0.9 s to produce the last chunk; the first must not wait for it.
    assert first < 0.7, arrivals
    assert last - first > 0.6, arrivals


@serve.deployment
class GeneratorCall:
    async def __call__(self, request: Request) -> Any:
        for i in range(3):
            if i:
                await asyncio.sleep(0.3)
            yield f"part{i} "


def test_generator_call_streams_over_http(backend: str) -> None:
    serve.run(GeneratorCall.bind(), backend=backend)
    with client() as c:
        started = time.perf_counter()
        with c.stream("GET", url("/")) as r:
            arrivals = [(time.perf_counter() - started, chunk) for chunk in r.iter_raw() if chunk]
    assert b"".join(chunk for _, chunk in arrivals) == b"part0 part1 part2 "
    assert arrivals[0][0] < 0.5 and arrivals[-1][0] - arrivals[0][0] > 0.4, arrivals


@serve.deployment
class Endless:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, request: Request) -> StreamingResponse:
        async def lines() -> Any:
            try:
                for i in range(10_000):
                    yield f"line {i}\n"
                    await asyncio.sleep(0.05)
                self.events.append("finished")
            finally:
                self.events.append("closed")

        return StreamingResponse(lines(), media_type="text/plain")

    def seen(self) -> list[str]:
        return list(self.events)


def test_client_leaving_a_stream_stops_the_generator(backend: str) -> None:
    handle = serve.run(Endless.bind(), backend=backend)
    with client() as c:
        with c.stream("GET", url("/")) as r:
            first = next(r.iter_raw())
        assert first.startswith(b"line 0")
    events = eventually(lambda: handle.seen.remote().result(timeout_s=5), lambda e: "closed" in e)
    assert events == ["closed"]

    # And the request no longer counts against the replica (or shutdown would wait for it).
    def in_flight() -> int:
        replicas = serve.status().applications["default"].deployments["Endless"].replicas
        return sum(r.in_flight or 0 for r in replicas)

    assert eventually(in_flight, lambda n: n == 0) == 0


# -- timeouts and disconnects cancel the request ---------------------------------


@serve.deployment
class Slow:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, request: Request) -> str:
        self.events.append("started")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        self.events.append("finished")
        return "too late"

    def seen(self) -> list[str]:
        return list(self.events)


@pytest.fixture
def request_timeout_half_a_second() -> Any:
    serve.start(http_options={"port": 0, "request_timeout_s": 0.5})
    yield  # shutdown() after the test forgets it


@pytest.mark.usefixtures("request_timeout_half_a_second")
def test_request_timeout_answers_408_and_cancels_the_ingress(backend: str) -> None:
    handle = serve.run(Slow.bind(), backend=backend)
    with client() as c:
        started = time.perf_counter()
        r = c.get(url("/"))
        elapsed = time.perf_counter() - started
        assert r.status_code == 408, r.text
        assert r.headers["x-request-id"] in r.text
        assert 0.4 < elapsed < 3, elapsed
        events = eventually(
            lambda: handle.seen.remote().result(timeout_s=5), lambda e: "cancelled" in e
        )
        assert events == ["started", "cancelled"]
        # The server keeps serving, and the admin endpoints work.
        assert c.get(url("/-/healthz")).status_code == 200


@serve.deployment
class Downstream:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def slow(self) -> str:
        self.events.append("started")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        self.events.append("finished")
        return "done"

    def seen(self) -> list[str]:
        return list(self.events)


@serve.deployment
class Upstream:
    def __init__(self, downstream: DeploymentHandle) -> None:
        self.downstream = downstream
        self.events: list[str] = []

    async def __call__(self, request: Request) -> str:
        self.events.append("started")
        try:
            return await self.downstream.slow.remote()
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise

    def seen(self) -> list[str]:
        return list(self.events)


def test_client_disconnect_cancels_ingress_and_downstream_call(backend: str) -> None:
    handle = serve.run(Upstream.bind(Downstream.bind()), backend=backend)
    downstream = serve.get_deployment_handle("Downstream", app_name="default")
    with httpx.Client(timeout=httpx.Timeout(10.0, read=0.3)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(url("/"))
    down = eventually(
        lambda: downstream.seen.remote().result(timeout_s=5), lambda e: "cancelled" in e
    )
    assert down == ["started", "cancelled"]
    up = eventually(lambda: handle.seen.remote().result(timeout_s=5), lambda e: "cancelled" in e)
    assert up == ["started", "cancelled"]
    with client() as c:  # and the server still answers
        assert c.get(url("/-/healthz")).status_code == 200


# -- the proxy's endpoints, metrics, access log ---------------------------------------


def test_proxy_endpoints(backend: str) -> None:
    serve.run(Named.bind("root"), name="root", route_prefix="/", backend=backend)
    serve.run(Echo.bind(), name="echo", route_prefix="/echo", backend=backend)
    with client() as c:
        health = c.get(url("/-/healthz"))
        assert health.status_code == 200

        routes = c.get(url("/-/routes"))
        assert routes.status_code == 200
        assert routes.headers["content-type"].startswith("application/json")
        assert routes.json() == {"/": "root", "/echo": "echo"}

        # The detailed status is the control endpoint's, not the data port's.
        assert c.get(url("/-/status")).status_code == 404

        # Admin paths are the proxy's own, even with an application at "/".
        assert c.get(url("/-/nothing")).status_code == 404
        serve.delete("echo")
        assert c.get(url("/-/routes")).json() == {"/": "root"}


def test_metrics_count_requests_per_application(backend: str) -> None:
    serve.run(Named.bind("api"), name="shop", route_prefix="/shop", backend=backend)
    serve.run(Fails.bind(), name="failing", route_prefix="/fail", backend=backend)
    with client() as c:
        for _ in range(3):
            assert c.get(url("/shop/x")).status_code == 200
        assert c.get(url("/fail"), params={"fail": "1"}).status_code == 500
        r = c.get(url("/metrics"))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = parse_prometheus(r.text)
    total = functools.partial(count, samples)

    assert total("tandem_http_requests_total", application="shop", status_code="200") == 3
    assert total("tandem_http_requests_total", application="failing", status_code="500") == 1
    assert total("tandem_http_request_latency_seconds_count", application="shop") == 3
    assert ("tandem_http_requests_in_flight", (("application", "shop"),)) in samples
    assert total("tandem_http_requests_in_flight", application="shop") == 0
    assert (
        total("tandem_deployment_replicas", application="shop", deployment="Named", state="RUNNING")
        == 1
    )


def test_access_log_has_one_line_per_request(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tandem.access")
    serve.run(Fails.bind(), route_prefix="/app", backend=backend)
    with client() as c:
        ok = c.post(url("/app/some/where"), params={"q": "1"}, content=b"x")
        failed = c.get(url("/app"), params={"fail": "1"})
        missing = c.get(url("/nowhere"))
    assert (ok.status_code, failed.status_code, missing.status_code) == (200, 500, 404)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tandem.access"]
    assert len(lines) == 3, lines
    for response, method, path, status in (
        (ok, "POST", "/app/some/where", "200"),
        (failed, "GET", "/app", "500"),
        (missing, "GET", "/nowhere", "404"),
    ):
        request_id = response.headers["x-request-id"]
        [line] = [line for line in lines if request_id in line]
        words = line.split()
        assert method in words and path in words and status in words, line
        assert any(w.endswith("ms") and w[:-2].replace(".", "").isdigit() for w in words), line


# -- multiplexed model id ------------------------------------------------------


@serve.deployment
class ModelId:
    async def __call__(self, request: Request) -> str:
        return f"model=[{serve.get_multiplexed_model_id()}]"


def test_multiplexed_model_id_header_in_any_spelling(backend: str) -> None:
    serve.run(ModelId.bind(), backend=backend)
    with client() as c:
        assert c.get(url("/")).text == "model=[]"
        for header in (
            "serve_multiplexed_model_id",
            "serve-multiplexed-model-id",
            "Serve-Multiplexed-Model-Id",
            "SERVE_MULTIPLEXED_MODEL_ID",
            "Serve_Multiplexed_Model_ID",
        ):
            r = c.get(url("/"), headers={header: f"m-{header[:3]}"})
            assert r.text == f"model=[m-{header[:3]}]", header


# -- FastAPI ingress -----------------------------------------------------------


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


fastapi_app = FastAPI()


@serve.deployment
@serve.ingress(fastapi_app)
class Shop:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting
        self.items: list[Item] = []

    @fastapi_app.get("/")
    def root(self) -> dict[str, Any]:
        return {"greeting": self.greeting, "count": len(self.items)}

    @fastapi_app.get("/items/{item_id}")
    def get_item(self, item_id: int, q: str | None = None, limit: int = 10) -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "limit": limit, "greeting": self.greeting}

    @fastapi_app.post("/items", status_code=201)
    async def create(self, item: Item) -> dict[str, Any]:
        self.items.append(item)
        return {"created": item.model_dump(), "count": len(self.items)}


def test_fastapi_ingress_under_route_prefix(backend: str) -> None:
    serve.run(Shop.bind("welcome"), route_prefix="/api", backend=backend)
    with client() as c:
        r = c.get(url("/api/"))
        assert r.status_code == 200, r.text
        assert r.json() == {"greeting": "welcome", "count": 0}

        r = c.get(url("/api/items/7"), params={"q": "red", "limit": "3"})
        assert r.status_code == 200, r.text
        assert r.json() == {"item_id": 7, "q": "red", "limit": 3, "greeting": "welcome"}
        assert c.get(url("/api/items/8")).json()["limit"] == 10

        r = c.post(url("/api/items"), json={"name": "pen", "price": 1.5})
        assert r.status_code == 201, r.text
        assert r.json() == {"created": {"name": "pen", "price": 1.5, "tags": []}, "count": 1}
        # self state persists between requests
        assert c.get(url("/api/")).json() == {"greeting": "welcome", "count": 1}

        bad = c.post(url("/api/items"), json={"name": "pen"})
        assert bad.status_code == 422
        assert any(err["loc"][-1] == "price" for err in bad.json()["detail"]), bad.text
        bad = c.get(url("/api/items/not-a-number"))
        assert bad.status_code == 422
        assert any(err["loc"][-1] == "item_id" for err in bad.json()["detail"]), bad.text

        assert c.get(url("/api/nope")).status_code == 404
        assert c.get(url("/items/7")).status_code == 404  # only served under the prefix
        assert c.get(url("/api/")).json()["count"] == 1  # a bad body created nothing


@serve.deployment
class NoRequestParameter:
    def __call__(self) -> str:
        return "called without the request"


@serve.deployment
def takes_nothing() -> dict[str, int]:
    return {"answer": 42}


@serve.deployment
class EchoQuery:
    def __call__(self, request: Request) -> Any:
        return request.query_params  # a Mapping, not a dict


def test_ingress_call_without_a_request_parameter_is_called_without_it(backend: str) -> None:
    serve.run(NoRequestParameter.bind(), name="a", route_prefix="/a", backend=backend)
    serve.run(takes_nothing.bind(), name="b", route_prefix="/b", backend=backend)
    with client() as c:
        assert c.get(url("/a")).text == "called without the request"
        assert c.post(url("/b"), content=b"ignored").json() == {"answer": 42}


def build_fastapi_app() -> FastAPI:
    """An @ingress builder (as in Ray Serve's docs): called where the replica runs."""
    built = FastAPI()

    @built.get("/")
    def root() -> dict[str, str]:
        return {"built": "in the replica"}

    @built.get("/where")
    def where() -> dict[str, str]:
        return {"replica": serve.get_replica_context().deployment}

    return built


@serve.deployment
@serve.ingress(build_fastapi_app)
class BuiltIngress:
    pass


def test_ingress_takes_a_function_that_builds_the_app(backend: str) -> None:
    serve.run(BuiltIngress.bind(), route_prefix="/built", backend=backend)
    with client() as c:
        assert c.get(url("/built/")).json() == {"built": "in the replica"}
        assert c.get(url("/built/where")).json() == {"replica": "BuiltIngress"}


def test_an_ingress_builder_that_returns_no_app_fails_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def builds_nothing() -> None:
        return None

    @serve.deployment
    @serve.ingress(builds_nothing)
    class BuildsNothing:
        pass

    serve.run(BuildsNothing.bind(), route_prefix="/nothing", backend="local")
    with client() as c:
        assert c.get(url("/nothing/")).status_code == 500
    assert "must return an ASGI app" in caplog.text


def test_a_returned_mapping_is_json(backend: str) -> None:
    serve.run(EchoQuery.bind(), backend=backend)
    with client() as c:
        assert c.get(url("/"), params={"q": "red", "n": "3"}).json() == {"q": "red", "n": "3"}


FUTURE_ANNOTATIONS_MODULE = """
from __future__ import annotations

import functools
from fastapi import FastAPI
from pydantic import BaseModel

import tandem as serve


class Order(BaseModel):
    name: str
    quantity: int


api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Orders:
    @api.post("/orders")
    async def create(self, order: Order) -> dict:
        return {"ordered": order.quantity, "of": order.name}

    @api.get("/orders/{order_id}")
    def get(self, order_id: int) -> dict:
        return {"order_id": order_id}


app = Orders.bind()
"""


def test_fastapi_ingress_in_a_module_with_postponed_annotations(
    backend: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "orders_future_annotations.py").write_text(FUTURE_ANNOTATIONS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import orders_future_annotations  # type: ignore[import-not-found]

    serve.run(orders_future_annotations.app, route_prefix="/shop", backend=backend)
    with client() as c:
        assert c.get(url("/shop/orders/5")).json() == {"order_id": 5}
        r = c.post(url("/shop/orders"), json={"name": "tea", "quantity": 2})
        assert r.status_code == 200, r.text
        assert r.json() == {"ordered": 2, "of": "tea"}


# -- backpressure ----------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class OneAtATime:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return "done"


def test_backpressure_answers_503_and_the_server_recovers(backend: str) -> None:
    serve.run(OneAtATime.bind(), backend=backend)

    async def two_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as c:
            first = asyncio.ensure_future(c.get(url("/"), params={"sleep": "1"}))
            await asyncio.sleep(0.3)
            second = await c.get(url("/"))
            return [await first, second]

    first, second = asyncio.run(two_at_once())
    assert first.status_code == 200 and first.text == "done"
    assert second.status_code == 503, second.text
    assert second.headers["x-request-id"] in second.text
    with client() as c:
        assert c.get(url("/")).text == "done"
