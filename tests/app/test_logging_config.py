"""``logging_config``: the logs of a deployment's replicas, as Ray Serve's LoggingConfig.

Covers: a dict or a ``LoggingConfig`` is taken by the decorator, ``.options()``
and config files, and a bad one fails there; ``log_level`` filters the records
of ``logging.getLogger("tandem.replica")`` in the replica (constructor, sync
and async methods); ``encoding`` TEXT or JSON lines that name the deployment,
replica and request; ``enable_access_log`` one line per request (handle calls
and HTTP); ``logs_dir`` one file per replica; on every backend. On the local
backend, where replicas share a process, each deployment's settings reach only
its own records, and records from elsewhere pass as before.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

import tandem as serve
from helpers import wait_for
from tandem._private.api import http_url
from tandem._private.app.config_file import apply_overrides, validate_config
from tandem.exceptions import DeploymentFailedError
from tandem.handle import DeploymentHandle

LOGGER = logging.getLogger("tandem.replica")


@serve.deployment
class Talker:
    def __init__(self) -> None:
        LOGGER.info("constructed")

    def say(self, text: str) -> str:  # sync: runs in a worker thread
        LOGGER.debug("debug %s", text)
        LOGGER.info("info %s", text)
        return text

    async def shout(self, text: str) -> str:
        LOGGER.warning("warning %s", text)
        return text.upper()

    def fail(self) -> None:
        raise ValueError("no")


def _run(logging_config: dict[str, Any], backend: str = "local", name: str = "talk") -> Any:
    app = Talker.options(name=f"Talker{name}", logging_config=logging_config).bind()
    return serve.run(app, name=name, route_prefix=None, backend=backend)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("replica_*.log"))


def _json_lines(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in _files(folder) for line in path.read_text().splitlines()]


def _by_message(records: list[dict[str, Any]], start: str) -> dict[str, Any]:
    found = [r for r in records if r["message"].startswith(start)]
    assert len(found) == 1, (start, records)
    return found[0]


# -- options -----------------------------------------------------------------


def test_a_dict_or_a_logging_config_is_taken_and_normalised() -> None:
    from_dict = serve.deployment(logging_config={"log_level": "debug", "encoding": "json"})(Talker)
    config = from_dict.deployment_options.logging_config
    assert config == serve.LoggingConfig(log_level="DEBUG", encoding="JSON")
    from_object = Talker.options(logging_config=serve.LoggingConfig(log_level=logging.ERROR))
    config = from_object.deployment_options.logging_config
    assert config is not None and config.log_level == "ERROR"
    assert config.enable_access_log is True and config.encoding == "TEXT"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"log_level": "LOUD"}, "log_level"),
        ({"log_level": 12}, "log_level"),
        ({"encoding": "XML"}, "encoding"),
        ({"colour": True}, "colour"),
        ({"additional_log_standard_attrs": ["bogus"]}, "bogus"),
        ({"logs_dir": ""}, "logs_dir"),
        ("DEBUG", "logging_config"),
    ],
)
def test_a_bad_logging_config_fails_where_it_is_written(config: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        serve.deployment(logging_config=config)(Talker)
    with pytest.raises(ValueError, match=problem):
        Talker.options(logging_config=config)


def test_a_config_file_override_is_checked_too() -> None:
    data = {
        "applications": [
            {
                "import_path": "unused:app",
                "deployments": [{"name": "Talker", "logging_config": {"encoding": "XML"}}],
            }
        ]
    }
    override = validate_config(data).applications[0].deployments[0]
    with pytest.raises(ValueError, match="encoding"):
        apply_overrides(Talker.bind(), {"Talker": override.options()}, "default")


# -- what the replicas write -----------------------------------------------


def test_json_lines_carry_the_replica_and_the_request_on_every_backend(
    backend: str, tmp_path: Path
) -> None:
    config = {"log_level": "DEBUG", "encoding": "JSON", "logs_dir": str(tmp_path)}
    handle = _run(config, backend)
    assert handle.say.remote("hi").result(timeout_s=30) == "hi"
    assert handle.shout.remote("hey").result(timeout_s=30) == "HEY"
    with pytest.raises(ValueError, match="no"):
        handle.fail.remote().result(timeout_s=30)

    assert len(_files(tmp_path)) == 1
    records = _json_lines(tmp_path)
    constructed = _by_message(records, "constructed")
    assert constructed["level"] == "INFO"
    assert "request_id" not in constructed  # not inside a request
    debug = _by_message(records, "debug hi")
    assert debug["level"] == "DEBUG"
    assert debug["deployment"] == "Talkertalk" and debug["application"] == "talk"
    assert debug["replica"].startswith("talk#Talkertalk#")
    assert _files(tmp_path)[0].name.startswith("replica_talk_Talkertalk_")
    assert debug["request_id"]
    assert _by_message(records, "info hi")["request_id"] == debug["request_id"]

    access = _by_message(records, "CALL say OK")
    assert access["request_id"] == debug["request_id"]
    assert (access["method"], access["call"], access["status"]) == ("CALL", "say", "OK")
    assert access["latency_ms"] >= 0
    assert _by_message(records, "CALL shout OK")["status"] == "OK"
    assert _by_message(records, "CALL fail ERROR")["status"] == "ERROR"


def test_text_lines_on_stderr_at_the_level_asked(capsys: pytest.CaptureFixture[str]) -> None:
    handle = _run({"log_level": "WARNING"})
    handle.say.remote("quiet").result(timeout_s=10)
    handle.shout.remote("loud").result(timeout_s=10)
    err = capsys.readouterr().err
    assert "quiet" not in err and "constructed" not in err
    assert "CALL" not in err  # access lines are INFO records
    [line] = [line for line in err.splitlines() if "warning loud" in line]
    assert " WARNING talk#Talkertalk#" in line
    assert line.endswith(" -- warning loud")


def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    handle = _run({"enable_access_log": False, "encoding": "JSON", "logs_dir": str(tmp_path)})
    handle.say.remote("hi").result(timeout_s=10)
    messages = [r["message"] for r in _json_lines(tmp_path)]
    assert "info hi" in messages
    assert not [m for m in messages if m.startswith("CALL")]


def test_additional_standard_attributes_are_added(tmp_path: Path) -> None:
    config = {
        "encoding": "JSON",
        "logs_dir": str(tmp_path),
        "additional_log_standard_attrs": ["funcName", "name"],
    }
    handle = _run(config)
    handle.say.remote("hi").result(timeout_s=10)
    info = _by_message(_json_lines(tmp_path), "info hi")
    assert (info["funcName"], info["name"]) == ("say", "tandem.replica")


def test_each_replica_writes_a_file_of_its_own(tmp_path: Path) -> None:
    app = Talker.options(
        num_replicas=2, logging_config={"encoding": "JSON", "logs_dir": str(tmp_path / "new")}
    ).bind()
    serve.run(app, route_prefix=None, backend="local")
    files = _files(tmp_path / "new")
    assert len(files) == 2
    replicas = {json.loads(path.read_text().splitlines()[0])["replica"] for path in files}
    assert len(replicas) == 2


def test_an_unusable_logs_dir_fails_the_deploy_clearly(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(DeploymentFailedError, match="logs_dir"):
        _run({"logs_dir": str(not_a_folder)})


@serve.deployment(logging_config={"encoding": "JSON"})
class Page:
    async def __call__(self, request: Any) -> str:
        return "page"


def test_http_requests_get_an_access_line_with_their_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve.run(Page.bind(), name="page", route_prefix="/page", backend="local")
    base = http_url()
    assert base is not None
    response = httpx.get(base + "/page/x", timeout=10)
    assert response.text == "page"
    # The line follows the response's last message, which the client may see first.
    err: list[str] = []
    wait_for(lambda: err.append(capsys.readouterr().err) or "GET /page/x" in "".join(err))
    lines = [json.loads(line) for line in "".join(err).splitlines() if "{" in line]
    access = _by_message(lines, "GET /page/x 200")
    assert (access["method"], access["path"], access["status"]) == ("GET", "/page/x", 200)
    assert access["request_id"] == response.headers["x-request-id"]


# -- replicas that share a process (local backend) ---------------------------


def test_each_deployment_configures_only_its_own_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tandem.replica")
    chatty = _run(
        {"log_level": "DEBUG", "encoding": "JSON", "logs_dir": str(tmp_path / "a")}, name="a"
    )
    terse = _run({"log_level": "ERROR", "logs_dir": str(tmp_path / "b")}, name="b")
    plain = serve.run(
        Talker.options(name="Plain").bind(), name="c", route_prefix=None, backend="local"
    )
    for handle in (chatty, terse, plain):
        handle.say.remote("hi").result(timeout_s=10)

    messages = [r["message"] for r in _json_lines(tmp_path / "a")]
    assert "debug hi" in messages and "info hi" in messages
    assert all(r["deployment"] == "Talkera" for r in _json_lines(tmp_path / "a"))
    assert (tmp_path / "b").is_dir() and not any(p.read_text() for p in _files(tmp_path / "b"))
    # The deployment without a logging_config logs as before, through tandem's handlers.
    passed_on = [r.getMessage() for r in caplog.records if r.name == "tandem.replica"]
    assert passed_on == ["constructed", "info hi"]
    LOGGER.info("outside any replica")
    assert caplog.records[-1].getMessage() == "outside any replica"


def test_the_replica_logger_is_as_it_was_once_the_replicas_stop(tmp_path: Path) -> None:
    before = (LOGGER.level, LOGGER.propagate, list(LOGGER.handlers))
    _run({"log_level": "DEBUG", "logs_dir": str(tmp_path)})
    assert LOGGER.getEffectiveLevel() == logging.DEBUG
    serve.delete("talk")
    assert (LOGGER.level, LOGGER.propagate, list(LOGGER.handlers)) == before


def test_handles_still_answer_after_a_deployment_with_logging_is_redeployed(
    tmp_path: Path,
) -> None:
    handle: DeploymentHandle = _run({"logs_dir": str(tmp_path / "one")})
    handle = _run({"logs_dir": str(tmp_path / "two"), "encoding": "JSON"})
    assert handle.say.remote("again").result(timeout_s=10) == "again"
    assert "info again" in [r["message"] for r in _json_lines(tmp_path / "two")]


# -- an application's logging_config -------------------------------------------------


@serve.deployment
class Quiet:
    def __init__(self, talker: DeploymentHandle) -> None:
        self._talker = talker
        LOGGER.info("quiet constructed")

    async def __call__(self, text: str) -> str:
        return str(await self._talker.say.remote(text))


def test_run_logging_config_is_the_default_of_deployments_without_their_own(
    tmp_path: Path,
) -> None:
    own = tmp_path / "own"
    app = Quiet.bind(
        Talker.options(logging_config={"encoding": "JSON", "logs_dir": str(own)}).bind()
    )
    handle = serve.run(
        app,
        route_prefix=None,
        backend="local",
        logging_config={"encoding": "JSON", "logs_dir": str(tmp_path / "app")},
    )
    assert handle.remote("hi").result() == "hi"
    app_lines = _json_lines(tmp_path / "app")
    assert {line["deployment"] for line in app_lines} == {"Quiet"}
    assert {line["deployment"] for line in _json_lines(own)} == {"Talker"}
    with pytest.raises(ValueError, match="logging_config.encoding"):
        serve.run(app, route_prefix=None, backend="local", logging_config={"encoding": "XML"})


def test_config_file_logging_config_applies_per_application(tmp_path: Path) -> None:
    config = validate_config(
        {
            "logging_config": {"log_level": "WARNING"},
            "applications": [
                {"name": "a", "route_prefix": "/a", "import_path": "m:a"},
                {
                    "name": "b",
                    "route_prefix": "/b",
                    "import_path": "m:b",
                    "logging_config": {"encoding": "JSON"},
                },
            ],
        }
    )
    a, b = config.applications
    assert config.app_logging(a) == serve.LoggingConfig(log_level="WARNING")
    assert config.app_logging(b) == serve.LoggingConfig(encoding="JSON")
    with pytest.raises(ValueError, match="encoding"):
        validate_config({"logging_config": {"encoding": "XML"}, "applications": [a.model_dump()]})
