"""``http_options.root_path``, as Ray Serve documents it: tandem serves behind a
reverse proxy that strips the root path, so requests arrive without it, and
applications see it in the ASGI scope's ``root_path`` and ``path`` (with their
route prefix after it), which is what Starlette and FastAPI route and build
URLs from. The scope reaches the replica, so every backend is checked.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

import tandem as serve
from tandem._private.api import http_url
from tandem._private.app.config_file import validate_config
from tandem.config import HTTPOptions

api = FastAPI()


@api.get("/items/{item}")
def read_item(item: str, request: Request) -> dict[str, Any]:
    return {
        "item": item,
        "root_path": request.scope["root_path"],
        "path": request.scope["path"],
        "url_for": str(request.url_for("read_item", item="8")),
    }


@serve.deployment
@serve.ingress(api)
class Items:
    pass


@serve.deployment
class Scope:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"root_path": request.scope["root_path"], "url": str(request.url)}


def base_url() -> str:
    url = http_url()
    assert url is not None
    return url


def test_root_path_is_in_the_scope_and_routes_still_match(backend: str) -> None:
    serve.start(http_options={"port": 0, "root_path": "/serve"})
    serve.run(Items.bind(), name="items", route_prefix="/api", backend=backend)
    serve.run(Scope.bind(), name="scope", route_prefix="/", backend=backend)
    base = base_url()
    with httpx.Client(timeout=10) as client:
        answer = client.get(base + "/api/items/7")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "item": "7",
            "root_path": "/serve/api",
            "path": "/serve/api/items/7",
            "url_for": base + "/serve/api/items/8",
        }
        answer = client.get(base + "/other", params={"q": "1"})
        assert answer.json() == {"root_path": "/serve", "url": base + "/serve/other?q=1"}
        # The reverse proxy in front strips the root path: a request that still has it is
        # routed as it is (here to the "/" application), not stripped a second time.
        assert client.get(base + "/serve/api/items/7").json()["root_path"] == "/serve"
        assert client.get(base + "/-/healthz").text == "success"
        assert client.get(base + "/-/routes").json() == {"/api": "items", "/": "scope"}


def test_without_a_catch_all_application_a_prefixed_request_is_not_found() -> None:
    serve.start(http_options={"port": 0, "root_path": "/serve"})
    serve.run(Items.bind(), route_prefix="/api", backend="local")
    answer = httpx.get(base_url() + "/serve/api/items/7", timeout=10)
    assert answer.status_code == 404
    assert "/serve/api/items/7" in answer.text


def test_root_path_values() -> None:
    assert HTTPOptions(root_path="/").root_path == ""
    assert HTTPOptions(root_path="/serve/").root_path == "/serve"
    assert HTTPOptions(root_path="/a/b").root_path == "/a/b"
    for bad in ("serve", "/a b", "/a?b", "/caf\u00e9"):
        with pytest.raises(ValueError, match="root_path must start with '/'"):
            serve.start(http_options={"root_path": bad})
    config = validate_config(
        {
            "http_options": {"root_path": "/serve"},
            "applications": [{"name": "a", "import_path": "x:y"}],
        }
    )
    assert config.http_options.root_path == "/serve"
