"""Values whose class is defined in the driver's ``__main__`` (a script, a notebook)
reach replicas in other processes and come back: they travel by value."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import BACKENDS

SCRIPT = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass

    import tandem as serve


    @dataclass
    class Graph:
        nodes: list


    def double(x):
        return 2 * x


    @serve.deployment
    class Walker:
        def count(self, graph):
            return len(graph.nodes)

        def echo(self, graph):
            return Graph(nodes=graph.nodes + ["back"])

        def apply(self, fn, x):
            return fn(x)

        @serve.batch(max_batch_size=4, batch_size_fn=lambda gs: sum(len(g.nodes) for g in gs))
        async def batched(self, graphs):
            return [len(g.nodes) for g in graphs]


    handle = serve.run(Walker.bind(), route_prefix=None, backend=sys.argv[1])
    assert handle.count.remote(Graph(nodes=[1, 2, 3])).result() == 3
    back = handle.echo.remote(Graph(nodes=["a"])).result()
    assert type(back).__name__ == "Graph" and back.nodes == ["a", "back"], back
    assert handle.apply.remote(double, 21).result() == 42
    assert handle.batched.remote(Graph(nodes=[1, 2])).result() == 2
    serve.shutdown()
    print("ok")
    """
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classes_and_functions_from_main_travel_by_value(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "main_values.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), backend],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
