"""``@batch``: calls that arrive close together run as one call on a list.

Each caller passes one item and gets back its own result; the decorated
method receives lists (one per argument) and returns a list of the same
length, or, as an async generator, yields such lists to stream results back to
every caller at once. A batch closes when it holds ``max_batch_size`` items
(counted by ``batch_size_fn`` if given) or ``batch_wait_timeout_s`` after its
first item arrived, or sooner if a request in it has a deadline (``calls.deadlines``):
then it closes before the earliest one, by the time recent batches took to run
and a margin. At most ``max_concurrent_batches`` run at a time.

``set_max_batch_size`` and ``set_batch_wait_timeout_s`` change the settings of
the replica they are called in (from ``reconfigure``, say), not those of the
other replicas of the deployment, even where replicas share a process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tandem._private.calls.context import current_request
from tandem._private.queues import drain, wait_event
from tandem._private.replica.replica import current_replica
from tandem._private.stats import Sizes


class _END:
    """End of one caller's stream. A class, not an object(): a class keeps its
    identity when wrappers travel by value to replica processes."""


# Queues of @batch functions called outside any replica (e.g. in a unit test).
_OUTSIDE_REPLICAS: dict[Any, Any] = {}


def _is_stop(value: Any) -> bool:
    return value is StopIteration or isinstance(value, StopIteration)


@dataclass
class _Request:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: asyncio.Future[Any] | None = None  # unary calls
    items: asyncio.Queue[Any] | None = None  # streaming calls
    done: bool = False
    deadline: float | None = None  # the request's (time.time()), if it has one


# A batch with a deadline in it closes this long (plus its run time) before it.
DEADLINE_MARGIN_S = 0.02


@dataclass
class _Settings:
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None = None

    def size(self, batch: list[_Request]) -> int:
        """The batch's size: its length, or what batch_size_fn says of its items."""
        if self.batch_size_fn is None:
            return len(batch)
        return int(self.batch_size_fn([_item(r) for r in batch]))


def _item(request: _Request) -> Any:
    """What a caller passed: the one argument of the batched method."""
    return request.args[0] if request.args else next(iter(request.kwargs.values()))


@dataclass
class _BatchQueue:
    """The waiting requests of one batched method in one replica."""

    call: Callable[..., Any]
    settings: _Settings
    streaming: bool
    waiting: list[_Request] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)
    # How long recent (unary) batches took to run: a batch closes that long before
    # the earliest deadline among its requests, so it can still answer in time.
    run_s: float = 0.0
    sizes: Sizes | None = None  # the replica's histogram of this method's batch sizes

    def submit(self, request: _Request) -> None:
        if self.settings.batch_size_fn is not None:
            size = self.settings.size([request])
            if size > self.settings.max_batch_size:
                raise ValueError(
                    f"This item's size is {size} (by batch_size_fn), more than "
                    f"max_batch_size={self.settings.max_batch_size}: it fits in no batch; "
                    "raise max_batch_size or split the item."
                )
        self.waiting.append(request)
        self.arrived.set()
        if self.task is None:
            self.task = asyncio.ensure_future(self._batches())

    def close(self) -> None:
        for task in (self.task, *self.running):
            if task is not None:
                task.cancel()

    async def _batches(self) -> None:
        slots = asyncio.Semaphore(self.settings.max_concurrent_batches)
        while True:
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.batch_wait_timeout_s
            while not self._full():
                self.arrived.clear()
                remaining = self._wait_end(deadline, loop) - loop.time()
                if remaining <= 0:
                    break
                if not await wait_event(self.arrived, remaining):
                    break
            batch = self._take()
            await slots.acquire()
            task = asyncio.ensure_future(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
            task.add_done_callback(lambda _: slots.release())

    def _wait_end(self, end: float, loop: asyncio.AbstractEventLoop) -> float:
        """When to stop waiting for more: at ``end`` (loop time), or when the earliest
        deadline of the waiting requests passes, if that is sooner."""
        deadlines = [r.deadline for r in self.waiting if r.deadline is not None and not r.done]
        if not deadlines:
            return end
        # Half as long again, and a few ms, for the way back and a busy loop.
        margin = 1.5 * self.run_s + DEADLINE_MARGIN_S
        return min(end, loop.time() + (min(deadlines) - time.time()) - margin)

    def _full(self) -> bool:
        return self.settings.size(self.waiting) >= self.settings.max_batch_size

    def _take(self) -> list[_Request]:
        """The longest run of waiting requests, oldest first, whose size fits."""
        settings = self.settings
        count = min(len(self.waiting), settings.max_batch_size)
        if settings.batch_size_fn is not None:
            count = 1
            while count < len(self.waiting):
                if settings.size(self.waiting[: count + 1]) > settings.max_batch_size:
                    break
                count += 1
        batch, self.waiting = self.waiting[:count], self.waiting[count:]
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not r.done]
        if not live:
            return
        if self.sizes is not None:
            self.sizes.observe(len(live))
        args, kwargs = _columns(live)
        try:
            if self.streaming:
                await self._stream(live, args, kwargs)
            else:
                started = time.perf_counter()
                results = await self.call(*args, **kwargs)
                took = time.perf_counter() - started
                self.run_s = took if not self.run_s else 0.8 * self.run_s + 0.2 * took
                _check_length(results, len(live))
                for request, result in zip(live, results, strict=True):
                    if request.result is not None and not request.result.done():
                        request.result.set_result(result)
        except BaseException as exc:
            for request in live:
                _fail(request, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _stream(
        self, batch: list[_Request], args: list[list[Any]], kwargs: dict[str, list[Any]]
    ) -> None:
        source = self.call(*args, **kwargs)
        try:
            async for results in source:
                _check_length(results, len(batch))
                for request, result in zip(batch, results, strict=True):
                    if request.done or request.items is None:
                        continue
                    if _is_stop(result):
                        request.done = True
                        request.items.put_nowait(_END)
                    else:
                        request.items.put_nowait(result)
                if all(r.done for r in batch):
                    break
        finally:
            await source.aclose()
        for request in batch:
            if not request.done and request.items is not None:
                request.done = True
                request.items.put_nowait(_END)


def _columns(batch: list[_Request]) -> tuple[list[list[Any]], dict[str, list[Any]]]:
    """Per-request arguments as one list per argument."""
    width = len(batch[0].args)
    names = set(batch[0].kwargs)
    for request in batch:
        if len(request.args) != width or set(request.kwargs) != names:
            raise TypeError(
                "Every call of a @batch method must pass the same arguments (the same "
                "number of positional arguments and the same keyword names)."
            )
    args = [[r.args[i] for r in batch] for i in range(width)]
    kwargs = {name: [r.kwargs[name] for r in batch] for name in names}
    return args, kwargs


def _check_length(results: Any, expected: int) -> None:
    if not isinstance(results, (list, tuple)) or len(results) != expected:
        got = (
            f"{len(results)} results" if isinstance(results, (list, tuple)) else repr(type(results))
        )
        raise TypeError(
            f"A @batch method got a batch of {expected} and must return (or yield) a list of "
            f"{expected} results, one per call; it returned {got}."
        )


def _fail(request: _Request, exc: BaseException) -> None:
    error = exc if not isinstance(exc, asyncio.CancelledError) else RuntimeError("batch cancelled")
    request.done = True
    if request.result is not None and not request.result.done():
        request.result.set_exception(error)
    if request.items is not None:
        request.items.put_nowait(error)


def _unowned(fn: Callable[..., Any], owner: Any) -> Callable[..., Any]:
    """``fn`` bound to ``owner`` without keeping it alive (its ``__del__`` runs on stop)."""
    ref = weakref.ref(owner)

    def bound(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        if target is None:
            raise RuntimeError("The replica that owned this batch is gone.")
        return fn(target, *args, **kwargs)

    return bound


def batch(
    _func: Callable[..., Any] | None = None,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Any:
    """Batch calls to an async method (or async generator) that takes and returns lists."""
    _validate(max_batch_size, batch_wait_timeout_s, max_concurrent_batches)
    settings = _Settings(
        max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn
    )

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        streaming = inspect.isasyncgenfunction(fn)
        if not (streaming or inspect.iscoroutinefunction(fn)):
            raise TypeError(
                f"@batch needs an async function or async generator; make {fn.__name__!r} "
                "`async def`."
            )
        params = list(inspect.signature(fn).parameters)
        is_method = bool(params) and params[0] == "self"

        def current_settings() -> _Settings:
            # Each replica has its own copy, made on first use, in the replica (as
            # its queues are): the decorator's are shared by every replica of a process.
            replica = current_replica()
            if replica is None:
                return settings
            mine: _Settings | None = replica.batch_settings.get(fn)
            if mine is None:
                mine = replica.batch_settings[fn] = dataclasses.replace(settings)
            return mine

        def queue_for(owner: Any) -> _BatchQueue:
            # Queues live with the replica (not in this closure, which travels by
            # value to replica processes and must stay picklable).
            replica = current_replica()
            queues = replica.batch_queues if replica is not None else _OUTSIDE_REPLICAS
            key = (fn.__qualname__, id(owner), id(asyncio.get_running_loop()))
            queue = queues.get(key)
            if queue is None:
                call = _unowned(fn, owner) if is_method else fn
                queue = _BatchQueue(call, current_settings(), streaming)
                queues[key] = queue
                if replica is not None:
                    replica.closers.append(queue.close)
                    queue.sizes = replica.stats.sizes(fn.__name__)
            return queue

        def make_request(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Request:
            request = current_request()
            deadline = None if request is None else request.deadline
            return _Request(args, kwargs, deadline=deadline)

        if streaming:

            @functools.wraps(fn)
            async def stream_wrapper(*args: Any, **kwargs: Any) -> Any:
                owner, rest = (args[0], args[1:]) if is_method else (None, args)
                request = make_request(rest, kwargs)
                request.items = asyncio.Queue()
                queue_for(owner).submit(request)
                try:
                    async for item in drain(request.items, _END):
                        yield item
                finally:
                    request.done = True

            wrapper: Any = stream_wrapper
        else:

            @functools.wraps(fn)
            async def call_wrapper(*args: Any, **kwargs: Any) -> Any:
                owner, rest = (args[0], args[1:]) if is_method else (None, args)
                request = make_request(rest, kwargs)
                request.result = asyncio.get_running_loop().create_future()
                queue_for(owner).submit(request)
                try:
                    return await asyncio.shield(request.result)
                finally:
                    request.done = True

            wrapper = call_wrapper

        def set_max_batch_size(value: int) -> None:
            mine = current_settings()
            _validate(value, mine.batch_wait_timeout_s, mine.max_concurrent_batches)
            mine.max_batch_size = value

        def set_batch_wait_timeout_s(value: float) -> None:
            mine = current_settings()
            _validate(mine.max_batch_size, value, mine.max_concurrent_batches)
            mine.batch_wait_timeout_s = value

        wrapper.set_max_batch_size = set_max_batch_size
        wrapper.set_batch_wait_timeout_s = set_batch_wait_timeout_s
        wrapper._get_max_batch_size = lambda: current_settings().max_batch_size
        wrapper._get_batch_wait_timeout_s = lambda: current_settings().batch_wait_timeout_s
        return wrapper  # type: ignore[no-any-return]

    if _func is not None:
        return decorate(_func)
    return decorate


def _validate(max_batch_size: Any, timeout: Any, concurrent: Any) -> None:
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {timeout!r}.")
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise ValueError(f"max_concurrent_batches must be an integer >= 1, got {concurrent!r}.")
