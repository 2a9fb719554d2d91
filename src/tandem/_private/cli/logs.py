"""``tandem logs``: a running server's recent replica log lines, through its control endpoint.

``main.py`` adds it to the ``tandem`` group; like every command that reaches a
server, it takes the control options (``--address``, ``--control``, ``--token-file``).
"""

from __future__ import annotations

import datetime
import json
import urllib.parse
from typing import Any

import click

from tandem._private.cli.flags import control_options

DEFAULT_LINES = 100
_INDENT = "    "


@click.command()
@click.argument("deployment", required=False)
@click.option("--app", default=None, help="Only this application's replicas.")
@click.option("--request-id", default=None, help="Only the lines of this request.")
@click.option(
    "--replica", default=None, help="Only this replica (its id, as `tandem status` shows)."
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(1, 10_000),
    default=DEFAULT_LINES,
    show_default=True,
    help="How many of the newest lines to print first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each line as a JSON object.")
@control_options
def logs(
    deployment: str | None,
    app: str | None,
    request_id: str | None,
    replica: str | None,
    follow: bool,
    count: int,
    as_json: bool,
    address: str,
    control: str | None,
    token_file: str | None,
) -> None:
    """Print the recent log lines of a running server's replicas (of DEPLOYMENT, if given).

    Each replica keeps its last 1,000 lines: what its code logged (any logger, at the
    deployment's logging_config log_level), access lines, and failed requests with
    their tracebacks.
    """
    from tandem._private.cli.control_client import ControlError, find_control, request, stream

    query: dict[str, Any] = {"limit": count}
    for name, value in (
        ("app", app),
        ("deployment", deployment),
        ("replica", replica),
        ("request_id", request_id),
    ):
        if value:
            query[name] = value
    if follow:
        query["follow"] = 1
    path = "/-/logs?" + urllib.parse.urlencode(query)
    show = _print_json if as_json else _print_line
    try:
        endpoint = find_control(address, control, token_file)
        if not follow:
            for line in request(endpoint, "GET", path)["lines"]:
                show(line)
            return
        for line in stream(endpoint, path):
            show(line)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # the way to stop --follow
        pass


def _print_json(line: dict[str, Any]) -> None:
    click.echo(json.dumps(line))


def _print_line(line: dict[str, Any]) -> None:
    click.echo(format_line(line))


def format_line(line: dict[str, Any]) -> str:
    """``time LEVEL deployment replica [request_id] message``, and the traceback below
    it, indented."""
    moment = datetime.datetime.fromtimestamp(float(line["time"]))
    parts = [
        moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}",
        str(line["level"]),
        str(line["deployment"]),
        str(line["replica"]).rpartition("#")[2],
    ]
    if line.get("request_id"):
        parts.append(f"[{line['request_id']}]")
    text = " ".join(parts) + " " + _indented(str(line["message"]))
    exception = line.get("exception")
    if exception:
        text += "\n" + _INDENT + _indented(str(exception))
    return text


def _indented(text: str) -> str:
    """Later lines of a multi-line text indented, so each record stays one block."""
    return text.replace("\n", "\n" + _INDENT)
