"""Give user code that crossed to a replica process by value its file name back.

A deployment's class reaches replica processes and Ray actors pickled by value
(its module's attribute is the Deployment, not the class, so cloudpickle cannot
send a reference), and cloudpickle names the code it sends ``<dynamic-code>``.
Tracebacks from the replica then say ``File "<dynamic-code>", line 13``: the
line is right, the file is lost. The driver knows the file
(:func:`source_file`); the replica puts it back (:func:`restore`) on the code of
the class's functions and of the functions of the same module they use, before
anything runs, so tracebacks, logs and the dashboard name the user's file.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

_LOST = "<dynamic-code>"  # cloudpickle's name for code it sent by value


def source_file(target: Any) -> str | None:
    """The file ``target`` (a class or function) was defined in, if Python knows it."""
    try:
        return inspect.getsourcefile(target)
    except (OSError, TypeError):
        return None


def restore(target: Any, path: str | None) -> None:
    """Name ``path`` as the file of ``target``'s code that lost its file name."""
    if path is None:
        return
    module = getattr(target, "__module__", None)
    functions = _functions(target)
    for function in list(functions):
        for value in getattr(function, "__globals__", {}).values():
            if isinstance(value, types.FunctionType):
                functions.append(value)  # a helper, sent along
    for function in functions:
        code = function.__code__
        # Only the module's own code: a decorator's wrapper (tandem's @batch, a
        # library's) that crossed by value is from another file.
        if code.co_filename == _LOST and function.__module__ == module:
            function.__code__ = _renamed(code, path)


def _functions(target: Any) -> list[types.FunctionType]:
    if isinstance(target, types.FunctionType):
        return [target]
    found: list[Any] = []
    for value in vars(target).values() if isinstance(target, type) else ():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            found.extend(f for f in (value.fget, value.fset, value.fdel) if f is not None)
        elif isinstance(value, types.FunctionType):
            found.append(value)
            wrapped = getattr(value, "__wrapped__", None)  # under a decorator
            while isinstance(wrapped, types.FunctionType):
                found.append(wrapped)
                wrapped = getattr(wrapped, "__wrapped__", None)
        elif isinstance(value, type):
            found.extend(_functions(value))  # a nested class
    return [f for f in found if isinstance(f, types.FunctionType)]


def _renamed(code: types.CodeType, path: str) -> types.CodeType:
    """``code``, and the code nested in it (closures, comprehensions), named ``path``."""
    consts = tuple(
        _renamed(c, path) if isinstance(c, types.CodeType) and c.co_filename == _LOST else c
        for c in code.co_consts
    )
    return code.replace(co_filename=path, co_consts=consts)
