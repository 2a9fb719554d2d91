"""Running the user's code: sync methods in the replica's worker threads (or on
its loop once they proved always fast, see inline.py), async ones on its event
loop, generators of either kind item by item.

:class:`UserCode` holds the user's object (or function) of one replica, looks
its methods up once, and runs them. When a caller gives up on a request whose
method is inside a worker thread, the thread cannot be interrupted: the
request's slot is left to the thread (see abandoned.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import inspect
import time
import types
import weakref
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from tandem._private.calls.responses import BlocksTheLoopError
from tandem._private.replica.abandoned import AbandonedRequests, name_of
from tandem._private.replica.admission import Slot
from tandem._private.replica.inline import InlineTrial
from tandem._private.replica.threads import WorkerThreads, contain

_DONE = object()
GENERATOR_TYPES = frozenset({types.GeneratorType, types.AsyncGeneratorType})


def takes_an_argument(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` (bound, if a method) can be called with one positional argument."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): assume it does
        return True
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(p.kind in positional for p in parameters)


@dataclass(frozen=True)
class Method:
    """A user method and how to run it."""

    fn: Callable[..., Any]
    is_async: bool  # a coroutine function or an async generator function
    is_generator: bool
    # Where a sync, non-generator method runs (threads or the loop); None otherwise.
    trial: InlineTrial | None = None

    @staticmethod
    def of(fn: Callable[..., Any], may_inline: bool = False) -> Method:
        plain = inspect.isfunction(fn) or inspect.ismethod(fn)
        call = fn if plain else getattr(fn, "__call__", fn)  # noqa: B004 - the method itself
        is_asyncgen = inspect.isasyncgenfunction(call)
        is_async = inspect.iscoroutinefunction(call) or is_asyncgen
        is_generator = is_asyncgen or inspect.isgeneratorfunction(call)
        plain_sync = may_inline and not is_async and not is_generator
        return Method(fn, is_async, is_generator, trial=InlineTrial(call) if plain_sync else None)


def _on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """Call ``fn`` in a worker thread as if it ran on ``loop``.

    Ray Serve runs a sync constructor on the replica's event loop, so constructors
    written for it may call ``asyncio.get_running_loop()``, create tasks or open
    an aiohttp session. tandem keeps the constructor off the loop (a model that
    loads for seconds must not stall other replicas' requests), and makes ``loop``
    this thread's running loop meanwhile: such code finds the replica's loop, and
    the tasks it creates start as soon as the constructor returns (its completion
    wakes the loop).
    """
    asyncio.events._set_running_loop(loop)
    try:
        return fn(*args, **kwargs)
    finally:
        asyncio.events._set_running_loop(None)


class UserCode:
    """The user's object of one replica, and how its methods run (see the module docstring)."""

    def __init__(
        self,
        target: Any,
        deployment: str,
        abandoned: AbandonedRequests,
        unavailable: Callable[[], Exception],
    ) -> None:
        self.target = target
        self.is_function = not inspect.isclass(target)
        self.obj: Any = None
        self._deployment = deployment
        self._abandoned = abandoned
        self._unavailable = unavailable  # the error for calls once the object is gone
        self._methods: dict[str, Method] = {}
        self._workers: WorkerThreads | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stopped = False

    def open(self, threads: int) -> None:
        """Bind to the running loop and make the worker threads (started as needed)."""
        self._loop = asyncio.get_running_loop()
        self._workers = WorkerThreads(threads, f"tandem-{self._deployment}")

    async def construct(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Build the user's object (a function is its own object); raises what they raise."""
        if self.is_function:
            self.obj = self.target
        elif inspect.iscoroutinefunction(getattr(self.target, "__init__", None)):
            # An ``async def __init__`` (Ray Serve allows it): awaited on the loop.
            obj = self.target.__new__(self.target)
            await obj.__init__(*args, **kwargs)
            self.obj = obj
        else:
            assert self._loop is not None
            construct = functools.partial(_on_loop, self._loop, self.target)
            self.obj = await self.run_in_thread(construct, args, kwargs)

    def hook(self, name: str) -> Callable[..., Any] | None:
        """An optional method of the user's class (``reconfigure``, ``check_health``)."""
        return None if self.is_function else getattr(self.obj, name, None)

    def method(self, name: str) -> Method:
        """A method by name, looked up once; later calls find it in ``_methods``."""
        method = self._methods.get(name)
        if method is not None:
            return method
        if self.stopped or self.obj is None:
            raise self._unavailable()
        if self.is_function:
            if name != "__call__":
                raise AttributeError(
                    f"Deployment {self._deployment!r} is a function and has no method {name!r}; "
                    "call the handle itself: handle.remote(...)."
                )
            fn = self.obj
        else:
            private = name.startswith("__") and name != "__call__"
            fn = None if private else getattr(self.obj, name, None)
            if fn is None or not callable(fn):
                raise AttributeError(f"Deployment {self._deployment!r} has no method {name!r}.")
        method = Method.of(fn, may_inline=True)
        self._methods[name] = method
        return method

    async def run(
        self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot | None
    ) -> Any:
        """Call a (non-generator) method: on the loop if async or proven fast, else in a
        worker thread."""
        if method.is_async:
            try:
                return await method.fn(*args, **kwargs)
            except (SystemExit, KeyboardInterrupt) as exc:
                raise contain(exc) from exc
        trial = method.trial
        if trial is not None and trial.inline:
            return run_inline(trial, method.fn, args, kwargs)
        return await self.run_sync(method, args, kwargs, slot)

    async def run_sync(
        self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot | None
    ) -> Any:
        """Call a sync method in a worker thread (timing it, while it is on trial)."""
        trial = method.trial
        if trial is None or trial.retired:
            return await self.run_in_thread(method.fn, args, kwargs, slot)
        return await self.run_in_thread(method.fn, args, kwargs, slot, trial)

    def iterate(
        self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot
    ) -> AsyncGenerator[Any, None]:
        """Call a generator method; its items, as an async generator either way."""
        items = method.fn(*args, **kwargs)
        return items if method.is_async else self.iterate_in_thread(items, slot)

    async def invoke(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call a method outside any request (a hook such as ``reconfigure``)."""
        return await self.run(Method.of(fn), args, kwargs, None)

    async def run_in_thread(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        slot: Slot | None = None,
        trial: InlineTrial | None = None,
    ) -> Any:
        assert self._workers is not None and self._loop is not None
        if kwargs:
            fn, args = functools.partial(fn, *args, **kwargs), ()
        job = self._workers.run(self._loop, contextvars.copy_context(), fn, args)
        try:
            return await job.future
        except asyncio.CancelledError:
            if slot is not None and not job.finished:
                self._abandoned.leave_to_thread(slot, job, name_of(fn))
            raise
        finally:
            if trial is not None and job.finished:
                trial.ran_in_thread(job.seconds)

    async def iterate_in_thread(self, gen: Any, slot: Slot) -> AsyncGenerator[Any, None]:
        assert self._workers is not None and self._loop is not None
        context = contextvars.copy_context()
        job = None
        try:
            while True:
                job = self._workers.run(self._loop, context, next, (gen, _DONE))
                item = await job.future
                if item is _DONE:
                    return
                yield item
        finally:
            if job is not None and not job.finished:
                # Still inside next(): close the generator once the thread leaves it.
                self._abandoned.leave_to_thread(slot, job, name_of(gen), then=gen.close)
            else:
                gen.close()

    def stop(self) -> None:
        """No more calls; worker threads end once they finish what they run."""
        self.stopped = True
        if self._workers is not None:
            self._workers.shutdown()

    def destroy(self) -> None:
        """Drop the user's object, so its ``__del__`` runs now."""
        obj, self.obj = self.obj, None
        self._methods.clear()
        if obj is None or self.is_function:
            return
        ref = _weakref_or_none(obj)
        del obj
        if ref is not None and ref() is not None:
            gc.collect()  # cycles through the object keep __del__ from running at once


def run_inline(
    trial: InlineTrial, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Call a proven-fast sync method right here, on the loop (see inline.py)."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except BlocksTheLoopError:
        trial.retire()  # it waits for something after all: threads from now on
        raise
    except (SystemExit, KeyboardInterrupt) as exc:
        raise contain(exc) from exc
    finally:
        trial.ran_inline(time.perf_counter() - start)


def close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        gen.close()


def _weakref_or_none(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None
