"""The ``HTTPOptions`` fields Ray Serve deprecated or keeps for reporting: each does
what Ray Serve documents, or is refused saying what to do instead.

``location`` (deprecated) overrides ``proxy_location``; ``host=None`` serves no
HTTP; ``middlewares`` and ``num_cpus`` are taken only empty (Ray Serve raises
for anything else too); ``root_url`` is the URL ``tandem run`` reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import tandem as serve
from helpers import GREETER, Server, free_port, wait_for
from tandem._private.api import http_url
from tandem._private.http.options import ProxyLocation
from tandem.config import HTTPOptions


@serve.deployment
class Hi:
    async def __call__(self) -> str:
        return "hi"


def test_location_overrides_proxy_location_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match="'location' is deprecated"):
        serve.start(http_options={"port": 0, "location": "Disabled"})
    serve.run(Hi.bind(), backend="local")
    assert http_url() is None
    serve.shutdown()

    with pytest.warns(DeprecationWarning):
        options = HTTPOptions(port=0, location="HeadOnly")
    serve.start(proxy_location="Disabled", http_options=options)
    serve.run(Hi.bind(), backend="local")
    assert http_url() is not None


def test_proxy_location_names() -> None:
    assert ProxyLocation.of("NoServer") is ProxyLocation.Disabled
    assert ProxyLocation.of(ProxyLocation.EveryNode) is ProxyLocation.EveryNode
    with pytest.raises(ValueError, match="proxy_location must be 'Disabled', 'HeadOnly'"):
        serve.start(proxy_location="Everywhere")
    serve.start(proxy_location=ProxyLocation.Disabled)
    serve.run(Hi.bind(), backend="local")
    assert http_url() is None


def test_no_host_serves_no_http() -> None:
    serve.start(http_options={"host": None, "port": 0})
    serve.run(Hi.bind(), backend="local")
    assert http_url() is None
    assert serve.get_app_handle("default").remote().result() == "hi"


def test_removed_fields_are_taken_only_empty() -> None:
    assert HTTPOptions(middlewares=[], num_cpus=0) == HTTPOptions()
    with pytest.raises(ValueError, match="middlewares are not supported.*@serve.ingress"):
        serve.start(http_options={"middlewares": [object()]})
    with pytest.raises(ValueError, match="num_cpus is not supported"):
        serve.start(http_options={"num_cpus": 1})


def test_tandem_run_reports_root_url(tmp_path: Path) -> None:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "greet.py").write_text(GREETER)
    port = free_port()
    config = {
        "http_options": {"port": port, "root_url": "https://models.example.com/v1"},
        "applications": [{"name": "default", "import_path": "greet:greeter"}],
    }
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    server = Server(
        [sys.executable, "-m", "tandem", "run", "serve.yaml"], folder, tmp_path / "log", port
    )
    try:
        server.wait_ready()
        reported = "serving 'default' at https://models.example.com/v1"
        assert wait_for(lambda: reported in server.output(), timeout_s=10), server.output()
    finally:
        server.kill()
