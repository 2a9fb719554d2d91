"""``tandem dashboard`` against a real ``tandem run``: who may see it, and the page
itself in headless Chromium (the graph, live calls, a killed replica, log lines)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import TANDEM_MODULE, Servers, default_ctrl_c, env, free_port, wait_for
from tandem._private.rundir import control_socket_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

APP = """
import logging

import tandem as serve
from starlette.requests import Request
from tandem.handle import DeploymentHandle

log = logging.getLogger("tandem.replica")


@serve.deployment
class Adder:
    def __call__(self, value: int) -> int:
        log.warning("adding one to %d", value)
        if value < 0:
            raise ValueError("negative input")
        return value + 1


@serve.deployment(num_replicas=2)
class Doubler:
    def __call__(self, value: int) -> int:
        return value * 2


@serve.deployment
class Front:
    def __init__(self, adder: DeploymentHandle, doubler: DeploymentHandle) -> None:
        self._adder = adder
        self._doubler = doubler

    async def __call__(self, request: Request) -> int:
        value = int(request.query_params["x"])
        return await self._doubler.remote(self._adder.remote(value))


app = Front.bind(Adder.bind(), Doubler.bind())
"""


class Dashboard:
    """A ``tandem dashboard`` process; ``url`` is the address it printed (with its token)."""

    def __init__(self, where: list[str], cwd: Path, log: Path) -> None:
        self._log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [*TANDEM_MODULE, "dashboard", *where, "--port", "0", "--no-browser"],
            cwd=cwd,
            env=env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=default_ctrl_c,
        )
        found = wait_for(self._printed_url, timeout_s=20)
        self.url = found
        self.base = found.split("/?", 1)[0]

    def _printed_url(self) -> str | None:
        if self.proc.poll() is not None:
            pytest.fail(f"tandem dashboard exited:\n{self._log_path.read_text()}")
        match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", self._log_path.read_text())
        return match.group(0) if match else None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Any, Dashboard]]:
    """``tandem run`` of APP on the process backend, and ``tandem dashboard`` for it."""
    (tmp_path / "graph_app.py").write_text(APP)
    servers = Servers(tmp_path, tmp_path)
    port = free_port()
    command = [*TANDEM_MODULE, "run", "graph_app:app", "--backend", "process", "--port", str(port)]
    server = servers.start(command, port)
    dashboard = None
    try:
        dashboard = Dashboard(["--address", server.url], tmp_path, tmp_path / "dashboard.log")
        yield server, dashboard
    finally:
        if dashboard is not None:
            dashboard.stop()
        servers.kill_all()


def test_only_the_printed_address_opens_it_and_only_read_only_routes_pass(
    served: tuple[Any, Dashboard],
) -> None:
    server, dashboard = served
    base = dashboard.base
    # Without the token: nothing, not even the page.
    assert httpx.get(base + "/").status_code == 401
    assert httpx.get(base + "/-/dashboard/state").status_code == 401
    assert httpx.get(base + "/?token=wrong").status_code == 401
    with httpx.Client() as browser:
        first = browser.get(dashboard.url)
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "httponly" in first.headers["set-cookie"].lower()
        page = browser.get(base + "/")
        assert page.status_code == 200 and "tandem dashboard" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        state = browser.get(base + "/-/dashboard/state").json()
        assert [a["name"] for a in state["applications"]] == ["default"]
        assert browser.get(base + "/-/logs?limit=5").status_code == 200
        # Nothing that changes the server or shows more than the dashboard does.
        assert browser.get(base + "/-/status").status_code == 404
        cookie = browser.cookies.jar
        raw = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
        raw.putrequest("GET", "/-/logs/../status", skip_host=True)
        raw.putheader("host", base.removeprefix("http://"))
        raw.putheader("cookie", "; ".join(f"{c.name}={c.value}" for c in cookie))
        raw.endheaders()
        try:
            assert raw.getresponse().status == 404  # as sent: no path tricks pass
        finally:
            raw.close()
        assert browser.post(base + "/-/shutdown").status_code == 501
        assert browser.put(base + "/-/applications", content=b"{}").status_code == 501
        assert browser.get(base + "/-/logs?follow=1").status_code == 400
        # A page elsewhere whose name was rebound to 127.0.0.1 sends its own Host.
        assert browser.get(base + "/", headers={"host": "evil.example:80"}).status_code == 403
    # None of it is on the data port.
    assert server.get("/-/dashboard").status_code == 404
    assert server.get("/-/dashboard/state").status_code == 404
    assert server.get("/").status_code != 200 or "tandem dashboard" not in server.get("/").text


def test_a_server_elsewhere_through_its_control_port_and_token(tmp_path: Path) -> None:
    (tmp_path / "graph_app.py").write_text(APP)
    servers = Servers(tmp_path, tmp_path)
    port, control_port = free_port(), free_port()
    command = [*TANDEM_MODULE, "run", "graph_app:app", "--port", str(port)]
    server = servers.start([*command, "--control-port", str(control_port)], port)
    dashboard = None
    try:
        token_file = control_socket_path(server.port).with_suffix(".token")
        control = ["--control", f"http://127.0.0.1:{control_port}"]
        bad = tmp_path / "bad.token"
        bad.write_text("not-the-token\n")
        refused = subprocess.run(
            [*TANDEM_MODULE, "dashboard", *control, "--token-file", str(bad), "--no-browser"],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0 and "refused the token" in refused.stderr
        where = [*control, "--token-file", str(token_file)]
        dashboard = Dashboard(where, tmp_path, tmp_path / "dashboard.log")
        with httpx.Client() as browser:
            browser.get(dashboard.url)
            state = browser.get(dashboard.base + "/-/dashboard/state").json()
        assert [d["name"] for d in state["applications"][0]["deployments"]] == [
            "Adder",
            "Doubler",
            "Front",
        ]
    finally:
        if dashboard is not None:
            dashboard.stop()
        servers.kill_all()


def test_dashboard_without_a_server_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TANDEM_MODULE, "dashboard", "--address", f"127.0.0.1:{free_port()}", "--no-browser"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "No tandem server of yours serves" in result.stderr


@pytest.mark.timeout(180)
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's chromium package)")
def test_page_in_chromium_shows_the_graph_live_calls_a_killed_replica_and_logs(
    served: tuple[Any, Dashboard], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, dashboard = served
    for value in range(5):
        assert server.get(f"/?x={value}").text == str((value + 1) * 2)
    failed = server.get("/?x=-1")
    assert failed.status_code == 500
    request_id = failed.headers["x-request-id"]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(dashboard.url)

            # The graph: the proxy's way in and the handles the bound graph passed.
            for node in ("HTTP", "Front", "Adder", "Doubler"):
                expect(page.locator(f'[data-node="{node}"]')).to_be_visible(timeout=15_000)
            for edge in ("HTTP->Front", "Front->Adder", "Front->Doubler"):
                expect(page.locator(f'[data-edge="{edge}"]')).to_have_count(1)
            expect(page.locator('[data-node="Doubler"]')).to_contain_text("2/2 replicas")

            # Live: calls made while the page watches show as a rate on their edge.
            for value in range(20):
                server.get(f"/?x={value}")
            expect(page.locator('[data-edge="Front->Doubler"]')).to_contain_text(
                re.compile(r"[1-9][0-9.]*/s"), timeout=15_000
            )

            # The failed request, by its id, in the replica that failed it; its id
            # filters the logs down to its lines.
            adder = page.locator('[data-deployment="Adder"]')
            expect(adder).to_contain_text("ValueError: negative input")
            adder.get_by_text(request_id).click()
            mine = page.locator(f'#logs tbody tr[data-request="{request_id}"]')
            others = page.locator(f'#logs tbody tr:not([data-request="{request_id}"])')
            expect(mine.first).to_be_visible(timeout=15_000)
            expect(others).to_have_count(0)
            expect(page.locator("#logs")).to_contain_text("adding one to -1")

            # Kill a replica: the page shows it taken out of service, and its successor.
            row = page.locator('[data-deployment="Doubler"] tbody tr').first
            victim = row.get_attribute("data-replica")
            pid = int(row.locator("td").nth(3).inner_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            expect(page.locator(f'[data-retired="{victim}"]')).to_be_visible(timeout=30_000)
            expect(page.locator(f'[data-replica="{victim}"]')).to_have_count(0)
            running = page.locator('[data-deployment="Doubler"] tr[data-state="RUNNING"]')
            expect(running).to_have_count(2, timeout=30_000)
            expect(page.locator('[data-deployment="Doubler"]')).to_contain_text("1 restart ")

            # Percentiles come from bucket counts, interpolated within a bucket.
            assert page.evaluate("quantile(0.5, [0, 10, 0], [0.001, 0.002])") == 0.0015
            assert page.evaluate("quantile(0.99, [10, 0, 0], [0.001, 0.002])") == 0.00099
            assert page.evaluate("quantile(0.5, [0, 0, 0], [0.001, 0.002])") is None

            shot = Path(os.environ.get("TANDEM_SCREENSHOTS", tmp_path)) / "dashboard.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert errors == []
        finally:
            browser.close()
