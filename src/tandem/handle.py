"""Handles to deployments and the responses their calls return.

``handle.remote(...)`` never blocks: it starts the request on tandem's event
loop and returns a :class:`DeploymentResponse` (or, with ``stream=True``, a
:class:`DeploymentResponseGenerator`) at once. Responses work from async code
(``await``) on any event loop and from sync code (``.result()``, ``for``).
"""

from __future__ import annotations

import functools
from typing import Any, Generic, TypeVar

from tandem._private import tracing
from tandem._private.calls.context import (
    DeploymentID,
    RequestMetadata,
    _replica_context,
    current_request,
)
from tandem._private.calls.deadlines import deadline_in
from tandem._private.calls.inbound import (
    Inbound,
    StreamCall,
    closing_call,
    closing_stream,
)
from tandem._private.calls.priority import checked as checked_priority
from tandem._private.calls.responses import DeploymentResponse, DeploymentResponseGenerator
from tandem._private.calls.runtime import Runtime, get_runtime

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]

_UNSET: Any = object()
# The deployment's class: ``DeploymentHandle[Model]`` in type hints, as in Ray Serve.
T = TypeVar("T")
_SERIALIZATIONS = ("cloudpickle", "pickle")
# The longest stream_chunk_ms: items that wait longer than this are not a stream's.
MAX_CHUNK_MS = 1000


class DeploymentHandle(Generic[T]):
    """Calls one deployment: ``handle.remote(...)`` or ``handle.method.remote(...)``."""

    __slots__ = (
        "_id",
        "_method",
        "_methods",
        "_model_id",
        "_priority",
        "_runtime",
        "_stream",
        "_stream_chunk_s",
        "_timeout_s",
    )

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        method_name: str = "__call__",
        stream: bool = False,
        multiplexed_model_id: str = "",
    ) -> None:
        self._id = DeploymentID(name=deployment_name, app_name=app_name)
        self._method = method_name
        self._stream = stream
        self._model_id = multiplexed_model_id
        self._methods: dict[str, DeploymentHandle[Any]] | None = None
        # Only for an application in local testing mode next to another backend's
        # runtime (see tandem.run); None: this process's runtime, looked up per call.
        self._runtime: Runtime | None = None
        self._timeout_s: float | None = None  # options(timeout_s=...): see calls.deadlines
        self._priority: int | None = None  # options(priority=...); None: the request's
        self._stream_chunk_s = 0.0  # options(stream_chunk_ms=...), in seconds

    @property
    def deployment_name(self) -> str:
        return self._id.name

    @property
    def app_name(self) -> str:
        return self._id.app_name

    def options(
        self,
        *,
        method_name: str = _UNSET,
        stream: bool = _UNSET,
        multiplexed_model_id: str = _UNSET,
        use_new_handle_api: bool = _UNSET,
        _prefer_local_routing: bool = _UNSET,
        _by_reference: bool = _UNSET,
        request_serialization: str = _UNSET,
        response_serialization: str = _UNSET,
        timeout_s: float | None = _UNSET,
        priority: int | None = _UNSET,
        stream_chunk_ms: float | None = _UNSET,
    ) -> DeploymentHandle[Any]:
        """A new handle with some call options changed; this one is left as it is.

        ``timeout_s`` (tandem's own): each call must be answered within that many
        seconds, or it fails with DeadlineExceededError; it is dropped if it has not
        started by then, else cancelled in every deployment it reached. A call made
        while serving a request with an earlier deadline keeps that one (None: only
        the inherited deadline, if any).

        ``priority`` (tandem's own): an int; of the calls waiting for a replica (in a
        caller's queue, or in the replica's own for a slot), higher ones go first,
        equal ones in order of arrival. None: the priority of the request being
        served (0 outside one).

        ``stream_chunk_ms`` (tandem's own, for streaming calls): the items of a
        stream from a replica in another process may wait up to that many
        milliseconds to cross together, so a stream of many small items takes
        fewer messages. The reader still gets them one by one. None or 0: each
        item leaves as soon as it is made.

        ``_prefer_local_routing`` and ``_by_reference`` choose how Ray Serve moves a
        call, never its result: tandem routes to the least loaded of two replicas and
        passes arguments by value on every backend, so both are accepted as they are.
        Arguments and results travel pickled (cloudpickle for code), so
        ``request_serialization`` and ``response_serialization`` accept "cloudpickle"
        and "pickle"; the formats that would restrict them to JSON-like values are
        refused.
        """
        for option, value in (
            ("request_serialization", request_serialization),
            ("response_serialization", response_serialization),
        ):
            if value is not _UNSET and value not in _SERIALIZATIONS:
                raise ValueError(
                    f"{option}={value!r} is not supported: tandem pickles arguments and "
                    "results (cloudpickle for code); use 'cloudpickle' or 'pickle', or leave "
                    "it out."
                )
        if timeout_s is not _UNSET and timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
                raise TypeError(
                    f"timeout_s must be a number of seconds or None, got "
                    f"{type(timeout_s).__name__}."
                )
            if not timeout_s > 0:  # also refuses NaN
                raise ValueError(f"timeout_s must be more than 0 seconds, got {timeout_s!r}.")
        if priority is not _UNSET and priority is not None:
            checked_priority(priority)
        if stream_chunk_ms is not _UNSET and stream_chunk_ms is not None:
            _check_chunk_ms(stream_chunk_ms)
        if method_name is not _UNSET and not isinstance(method_name, str):
            raise TypeError(f"method_name must be a str, got {type(method_name).__name__}.")
        if multiplexed_model_id is not _UNSET and not isinstance(multiplexed_model_id, str):
            raise TypeError(
                f"multiplexed_model_id must be a str, got {type(multiplexed_model_id).__name__}."
            )
        handle: DeploymentHandle[Any] = DeploymentHandle(
            self._id.name,
            self._id.app_name,
            method_name=self._method if method_name is _UNSET else method_name,
            stream=self._stream if stream is _UNSET else bool(stream),
            multiplexed_model_id=self._model_id
            if multiplexed_model_id is _UNSET
            else multiplexed_model_id,
        )
        handle._runtime = self._runtime
        handle._timeout_s = self._timeout_s if timeout_s is _UNSET else timeout_s
        handle._priority = self._priority if priority is _UNSET else priority
        if stream_chunk_ms is _UNSET:
            handle._stream_chunk_s = self._stream_chunk_s
        else:
            handle._stream_chunk_s = (stream_chunk_ms or 0) / 1000
        if handle._stream_chunk_s and not handle._stream:
            raise ValueError(
                "stream_chunk_ms applies to streaming calls: set stream=True with it "
                "(handle.options(stream=True, stream_chunk_ms=...))."
            )
        return handle

    def __getattr__(self, name: str) -> DeploymentHandle[Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        # ``handle.method.remote()`` is common on hot paths: keep the method handles.
        methods = self._methods
        if methods is None:
            methods = self._methods = {}
        handle = methods.get(name)
        if handle is None:
            handle = methods[name] = self.options(method_name=name)
        return handle

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Start a call: a DeploymentResponse, or a DeploymentResponseGenerator if stream=True."""
        pending = None
        streams = 0
        for values in (args, kwargs.values()) if kwargs else (args,):
            for value in values:
                if isinstance(value, _SPECIAL_ARGUMENTS):
                    if isinstance(value, DeploymentResponseGenerator):
                        streams += 1
                    else:
                        pending = DeploymentResponse
        runtime = self._runtime or get_runtime()
        inbound = None
        if streams:
            args, kwargs, inbound = _stream_arguments(args, kwargs, streams, runtime)
        parent = current_request()
        deadline = None if parent is None else parent.deadline  # calls inherit it
        if self._timeout_s is not None:
            deadline = deadline_in(self._timeout_s, deadline)
        priority = self._priority
        if priority is None:
            priority = 0 if parent is None else parent.priority
        meta = RequestMetadata(
            # A request keeps its id across hops so logs and cancellation can follow it.
            parent.request_id if parent is not None else RequestMetadata.new_request_id(),
            self._id.app_name,
            self._id.name,
            self._method,
            self._stream,
            self._model_id,
            deadline=deadline,
            priority=priority,
            stream_chunk_s=self._stream_chunk_s,
            caller=_caller(self._id.app_name),
        )
        if self._stream:
            source = runtime.stream(self._id, meta, args, kwargs, pending)
            if inbound is not None:
                source = closing_stream(source, inbound)
            if tracing.SPANS is not None:
                source = tracing.SPANS.client_stream(source, meta)
            # Passed on to another call before it begins, a replica may make it instead
            # (the StreamCall is made then, if ever).
            handoff = None
            if pending is None:
                handoff = functools.partial(StreamCall.of, self._id, meta, args, kwargs)
            return DeploymentResponseGenerator(runtime, source, handoff, deadline)
        call = runtime.call(self._id, meta, args, kwargs, pending)
        if inbound is not None:
            call = closing_call(call, inbound)
        if tracing.SPANS is not None:
            call = tracing.SPANS.client_call(call, meta)
        return DeploymentResponse(runtime, call, meta)

    def _call_options(self) -> tuple[Any, ...]:
        """What this handle's calls are made with, in _rebuild_handle's order."""
        return (
            self._method,
            self._stream,
            self._model_id,
            self._timeout_s,
            self._priority,
            self._stream_chunk_s,
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self._id.name, self._id.app_name, *self._call_options()))

    def _key(self) -> tuple[Any, ...]:
        return (self._id, *self._call_options())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeploymentHandle) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = "" if self._method == "__call__" else f", method_name={self._method!r}"
        return f"DeploymentHandle(deployment={self._id.name!r}, app={self._id.app_name!r}{extra})"


def _stream_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], streams: int, runtime: Runtime
) -> tuple[tuple[Any, ...], dict[str, Any], Inbound]:
    """A call's DeploymentResponseGenerator argument as the stream its replica reads:
    the call itself if it has not begun (the replica makes it: its items need not
    pass through here), else the generator."""
    if streams > 1:
        raise TypeError(
            f"A call takes at most one DeploymentResponseGenerator argument, got {streams}; "
            "merge the streams in a deployment of their own and pass its stream instead."
        )

    made: list[Inbound] = []

    def swap(value: Any) -> Any:
        if not isinstance(value, DeploymentResponseGenerator):
            return value
        # Closing the Inbound (the call ended or stopped reading) closes the
        # generator (or the call made from it), which stops the upstream call.
        call = value.hand_off()
        made.append(Inbound(value) if call is None else Inbound(call, runtime))
        return made[0]

    args = tuple(map(swap, args))
    kwargs = {key: swap(value) for key, value in kwargs.items()}
    return args, kwargs, made[0]


def _check_chunk_ms(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"stream_chunk_ms must be a number of milliseconds or None, got {type(value).__name__}."
        )
    if not 0 <= value <= MAX_CHUNK_MS:  # also refuses NaN
        raise ValueError(
            f"stream_chunk_ms must be between 0 and {MAX_CHUNK_MS} milliseconds, got {value!r}."
        )


def _rebuild_handle(
    name: str,
    app: str,
    method: str,
    stream: bool,
    model_id: str,
    timeout_s: float | None = None,
    priority: int | None = None,
    stream_chunk_s: float = 0.0,
) -> DeploymentHandle[Any]:
    handle: DeploymentHandle[Any] = DeploymentHandle(
        name, app, method_name=method, stream=stream, multiplexed_model_id=model_id
    )
    handle._timeout_s = timeout_s
    handle._priority = priority
    handle._stream_chunk_s = stream_chunk_s
    return handle


# Arguments that .remote() must look at: responses to resolve, streams to refuse.
_SPECIAL_ARGUMENTS = (DeploymentResponse, DeploymentResponseGenerator)


def _caller(app_name: str) -> str:
    """The deployment making a call from its replica (see ``RequestMetadata.caller``)."""
    context = _replica_context.get()
    if context is None:
        return ""
    if context.app_name == app_name:
        return context.deployment
    return f"{context.app_name}/{context.deployment}"
