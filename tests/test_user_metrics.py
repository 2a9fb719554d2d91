"""Custom metrics (``tandem.metrics``, Ray Serve's ``ray.serve.metrics``).

Covers: Ray's signatures, defaults and errors; metrics made in a deployment
carry its deployment, replica and application tags (and the request's route
where they declare one) and reach the data port's ``/metrics`` under Ray's
names on every backend; the driver's own metrics too, without those tags; a
replaced replica's series disappear, its successor's appear, and counters do
not go back while a replica lives.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import tandem as serve
from helpers import eventually
from tandem import metrics
from tandem._private.api import http_url
from tandem._private.http.metrics import REFRESH_INTERVAL_S, ProxyMetrics
from tandem._private.http.user_metrics import UserMetrics
from tandem._private.user_metrics import STORE, HistogramValue, MetricsReport, SeriesValue

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape() -> Samples:
    base = http_url()
    assert base is not None, "no HTTP server runs"
    response = httpx.get(base + "/metrics", timeout=10.0)
    assert response.status_code == 200
    samples: Samples = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels = []
        for part in rest.rstrip("}").split(","):
            if "=" in part:
                key, _, raw = part.partition("=")
                labels.append((key, raw.strip('"')))
        samples[(name, tuple(sorted(labels)))] = float(value)
    return samples


def series(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` whose labels include ``labels``."""
    return {
        sample_labels: value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = series(samples, name, **labels)
    assert len(found) <= 1, found
    return next(iter(found.values()), None)


# -- Ray's API: signatures, defaults, errors -----------------------------------------


def test_signatures_and_defaults_are_rays() -> None:
    def params(fn: Any) -> list[tuple[str, Any]]:
        return [
            (p.name, p.default)
            for p in inspect.signature(fn).parameters.values()
            if p.name != "self"
        ]

    empty = inspect.Parameter.empty
    for cls in (metrics.Counter, metrics.Gauge):
        assert params(cls) == [("name", empty), ("description", ""), ("tag_keys", None)]
    assert params(metrics.Histogram) == [
        ("name", empty),
        ("description", ""),
        ("boundaries", None),
        ("tag_keys", None),
    ]
    assert params(metrics.Counter.inc) == [("value", 1.0), ("tags", None)]
    assert params(metrics.Gauge.set) == [("value", empty), ("tags", None)]
    assert params(metrics.Histogram.observe) == [("value", empty), ("tags", None)]
    assert params(metrics.Counter.set_default_tags) == [("default_tags", empty)]


def test_info_and_default_tags_outside_a_replica() -> None:
    counter = metrics.Counter("um_info_counter", description="d", tag_keys=("a", "b"))
    assert counter.set_default_tags({"a": "1"}) is counter
    assert counter.info == {
        "name": "um_info_counter",
        "description": "d",
        "tag_keys": ("a", "b"),
        "default_tags": {"a": "1"},
    }
    histogram = metrics.Histogram("um_info_histogram", boundaries=[1.0, 2.0])
    assert histogram.info["boundaries"] == [1.0, 2.0]
    assert histogram.boundaries == [1.0, 2.0]
    # Outside a replica the Serve tag keys are the user's to use.
    metrics.Gauge("um_info_gauge", tag_keys=("deployment",)).set(1, tags={"deployment": "x"})


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: metrics.Counter(""), ValueError, "name"),
        (lambda: metrics.Counter("um_e1", tag_keys=["a"]), TypeError, "tuple"),
        (lambda: metrics.Counter("um_e2", tag_keys=(1,)), TypeError, "str"),
        (lambda: metrics.Histogram("um_e3"), ValueError, "boundaries"),
        (lambda: metrics.Histogram("um_e4", boundaries=[]), ValueError, "boundaries"),
        (lambda: metrics.Histogram("um_e5", boundaries=[0, 1]), ValueError, "positive"),
        (lambda: metrics.Histogram("um_e6", boundaries=["1"]), TypeError, "boundaries[0]"),
        (lambda: metrics.Gauge("um_kind_clash") and metrics.Counter("um_kind_clash"), ValueError,
         "gauge named 'um_kind_clash'"),
    ],
)  # fmt: skip
def test_bad_metric_is_refused(make: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        make()


@pytest.mark.parametrize(
    ("record", "error", "words"),
    [
        (lambda c: c.inc(), ValueError, "Missing value for tag key.*model"),
        (lambda c: c.inc(tags={"model": "m", "other": "x"}), ValueError, "'other' is not one"),
        (lambda c: c.inc(tags={"model": 1}), TypeError, "Tag values must be str"),
        (lambda c: c.inc(0, tags={"model": "m"}), ValueError, "> 0"),
        (lambda c: c.inc(-1.5, tags={"model": "m"}), ValueError, "> 0"),
        (lambda c: c.inc("1", tags={"model": "m"}), TypeError, "int or float"),
        (lambda c: c.set_default_tags({"other": "x"}), ValueError, "Unrecognized tag key 'other'"),
        (lambda c: c.set_default_tags({"model": 2}), TypeError, "Tag values must be str"),
    ],
)
def test_bad_record_is_refused(record: Any, error: type[Exception], words: str) -> None:
    counter = metrics.Counter("um_bad_record", tag_keys=("model",))
    with pytest.raises(error, match=words):
        record(counter)


def test_invalid_names_warn_and_discard_as_in_ray() -> None:
    with pytest.warns(UserWarning, match="not valid"):
        discarded = metrics.Counter("um-dash")
    discarded.inc()  # records nothing, raises nothing
    with pytest.warns(FutureWarning, match="':'"):
        metrics.Gauge("um:colon").set(1)
    metrics.Gauge("um_none").set(None)  # None: nothing to do, as in Ray


def test_histograms_of_one_name_with_other_boundaries_share_the_first_buckets() -> None:
    metrics.Histogram("um_bounds", boundaries=[1]).observe(0.5)
    metrics.Histogram("um_bounds", boundaries=[1, 2, 3]).observe(5)  # no IndexError
    [(_, value_)] = [
        (s.labels, s.value) for s in STORE.report(None).series if s.name == "um_bounds"
    ]
    assert value_ == HistogramValue((1.0,), (1, 1), 5.5)


def test_metrics_pickle_as_their_arguments() -> None:
    histogram = metrics.Histogram("um_pickled", "d", boundaries=[1, 2], tag_keys=("a",))
    copy = pickle.loads(pickle.dumps(histogram))
    assert copy.info == {**histogram.info, "default_tags": {}}


# -- the driver's collector: newest report per replica, merged ---------------------------


def _report(seq: int, *series: tuple[str, str, Any], labels: Any = ()) -> MetricsReport:
    kinds = {name: (kind, f"{name} doc") for name, kind, _ in series}
    values = tuple(SeriesValue(name, labels, v) for name, _, v in series)
    return MetricsReport(seq, kinds, values)


def _collected(collector: UserMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in collector.collect()
    }


def test_collector_keeps_the_newest_report_and_forgets_unlisted_replicas() -> None:
    listed: list[tuple[str, MetricsReport | None]] = [("r1", _report(5, ("um_c1", "counter", 3.0)))]
    collector = UserMetrics(lambda: listed)
    assert _collected(collector)["ray_um_c1"] == [("ray_um_c1_total", {}, 3.0)]
    listed[:] = [("r1", _report(4, ("um_c1", "counter", 2.0)))]  # older, arrived late
    assert _collected(collector)["ray_um_c1"] == [("ray_um_c1_total", {}, 3.0)]
    listed[:] = [("r1", None)]  # no report this time: the last one stands
    assert _collected(collector)["ray_um_c1"] == [("ray_um_c1_total", {}, 3.0)]
    listed[:] = []  # the replica is gone, and so are its series
    assert "ray_um_c1" not in _collected(collector)


def test_collector_adds_up_equal_series_and_refuses_a_kind_clash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    histogram = HistogramValue((1.0,), (1, 2), 5.5)
    listed = [
        ("a", _report(1, ("um_m1", "counter", 1.0), ("um_m2", "gauge", 1.0),
                      ("um_m3", "histogram", histogram), ("um_m4", "counter", 1.0))),
        ("b", _report(1, ("um_m1", "counter", 2.0), ("um_m2", "gauge", 7.0),
                      ("um_m3", "histogram", histogram), ("um_m4", "gauge", 9.0))),
    ]  # fmt: skip
    collector = UserMetrics(lambda: listed)
    with caplog.at_level(logging.WARNING, logger="tandem"):
        collected = _collected(collector)
        _collected(collector)
    assert collected["ray_um_m1"] == [("ray_um_m1_total", {}, 3.0)]
    assert collected["ray_um_m2"] == [("ray_um_m2", {}, 7.0)]  # a gauge: the last listed
    assert collected["ray_um_m3"] == [
        ("ray_um_m3_bucket", {"le": "1.0"}, 2),
        ("ray_um_m3_bucket", {"le": "+Inf"}, 6),
        ("ray_um_m3_count", {}, 6),
        ("ray_um_m3_sum", {}, 11.0),
    ]
    assert collected["ray_um_m4"] == [("ray_um_m4_total", {}, 1.0)]  # the first kind wins
    clashes = [r.getMessage() for r in caplog.records if "um_m4" in r.getMessage()]
    assert len(clashes) == 1 and "different names" in clashes[0]


def test_counter_named_total_is_not_doubled() -> None:
    collector = UserMetrics(lambda: [("r", _report(1, ("um_x_total", "counter", 1.0)))])
    assert _collected(collector)["ray_um_x"] == [("ray_um_x_total", {}, 1.0)]


def test_scrapes_share_one_refresh_per_interval() -> None:
    now = [100.0]
    refreshes = []

    async def refresh() -> None:
        refreshes.append(now[0])
        await asyncio.sleep(0)

    metrics_ = ProxyMetrics(
        lambda: type("S", (), {"applications": {}})(),
        list,
        refresh=refresh,
        clock=lambda: now[0],
    )

    async def scrapes() -> None:
        await asyncio.gather(metrics_.scrape(), metrics_.scrape(), metrics_.scrape())
        now[0] += REFRESH_INTERVAL_S / 2
        await metrics_.scrape()
        now[0] += REFRESH_INTERVAL_S
        await metrics_.scrape()

    asyncio.run(scrapes())
    assert refreshes == [100.0, 100.0 + REFRESH_INTERVAL_S * 1.5]


# -- inside deployments, on every backend ------------------------------------------------

# Made at import, outside any replica: in a replica process too, when it imports this module.
MODULE_LEVEL = metrics.Counter("um_module_level", description="Made at import.")


@serve.deployment
class Instrumented:
    def __init__(self) -> None:
        self.calls = metrics.Counter("um_calls", description="Calls.", tag_keys=("model",))
        self.calls.set_default_tags({"model": "123"})
        self.routes = metrics.Counter("um_routes", description="By route.", tag_keys=("route",))
        self.size = metrics.Gauge("um_size", description="A size.")
        self.latency = metrics.Histogram("um_latency", "Latency.", boundaries=[0.5, 1, 4])

    def record(self, amount: float) -> str:
        self.calls.inc()
        self.calls.inc(amount, tags={"model": "other"})
        self.routes.inc()
        self.size.set(amount)
        self.latency.observe(amount)
        return serve.get_replica_context().replica_tag

    def __call__(self, request: Request) -> str:
        self.routes.inc(tags={})
        return serve.get_replica_context().replica_tag

    def count_module_level(self) -> None:
        MODULE_LEVEL.inc()

    def misuse(self, how: str) -> str:
        try:
            if how == "reserved":
                metrics.Counter("um_reserved", tag_keys=("replica",))
            elif how == "extra":
                self.calls.inc(tags={"nope": "x"})
            elif how == "negative":
                self.calls.inc(-1)
        except (TypeError, ValueError) as error:
            return f"{type(error).__name__}: {error}"
        return "no error"


def test_metrics_made_in_a_replica_reach_metrics_with_serve_tags(backend: str) -> None:
    handle = serve.run(Instrumented.bind(), name="um_app", route_prefix="/um", backend=backend)
    replica = handle.record.remote(3).result(timeout_s=10)
    handle.record.remote(0.25).result(timeout_s=10)
    assert httpx.get(http_url() + "/um/anything", timeout=10).text == replica
    # A name per backend: the driver's metrics outlive shutdown(), as Ray's do.
    driver = metrics.Counter(f"um_driver_{backend}", description="Driver.", tag_keys=("k",))
    driver.inc(2, tags={"k": "v"})

    tags = {"application": "um_app", "deployment": "Instrumented", "replica": replica}
    samples = eventually(scrape, lambda s: value(s, "ray_um_size", **tags) == 0.25)
    assert value(samples, "ray_um_calls_total", **tags, model="123") == 2
    assert value(samples, "ray_um_calls_total", **tags, model="other") == 3.25
    assert set(series(samples, "ray_um_calls_total")) == {
        tuple(sorted({**tags, "model": model}.items())) for model in ("123", "other")
    }
    assert value(samples, "ray_um_size", **tags) == 0.25
    buckets = {
        dict(labels)["le"]: count
        for labels, count in series(samples, "ray_um_latency_bucket", **tags).items()
    }
    assert buckets == {"0.5": 1, "1.0": 1, "4.0": 2, "+Inf": 2}
    assert value(samples, "ray_um_latency_count", **tags) == 2
    assert value(samples, "ray_um_latency_sum", **tags) == 3.25
    # The route: the HTTP request's route prefix, "" for handle calls (as in Ray Serve).
    assert value(samples, "ray_um_routes_total", **tags, route="/um") == 1
    assert value(samples, "ray_um_routes_total", **tags, route="") == 2
    # The driver's own metric: exported too, without Serve's tags.
    assert series(samples, f"ray_um_driver_{backend}_total") == {(("k", "v"),): 2}

    # Bad records raise Ray's errors in the replica, which serves on.
    assert handle.misuse.remote("reserved").result(timeout_s=10).startswith("ValueError")
    assert "'nope' is not one" in handle.misuse.remote("extra").result(timeout_s=10)
    assert handle.misuse.remote("negative").result(timeout_s=10).startswith("ValueError")
    assert handle.record.remote(1).result(timeout_s=10) == replica


def test_metric_made_outside_a_replica_has_no_serve_tags(backend: str) -> None:
    """Wherever the module made it (the driver, a replica's process), it is exported
    without Serve's tags, the counts of every process added up."""
    handle = serve.run(Instrumented.bind(), name="um_app", route_prefix="/um", backend=backend)
    before = value(scrape(), "ray_um_module_level_total") or 0
    handle.count_module_level.remote().result(timeout_s=10)
    handle.count_module_level.remote().result(timeout_s=10)
    samples = eventually(scrape, lambda s: value(s, "ray_um_module_level_total") == before + 2)
    assert series(samples, "ray_um_module_level_total") == {(): before + 2}


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=2)
class Replaceable:
    def __init__(self) -> None:
        self.counter = metrics.Counter("um_lives", description="Calls in this life.")
        self.sick = False

    def count(self) -> str:
        self.counter.inc()
        return serve.get_replica_context().replica_tag

    def fall_ill(self) -> None:
        self.sick = True

    def die(self) -> None:
        os._exit(1)

    def check_health(self) -> None:
        if self.sick:
            raise RuntimeError("told to fail")


def _lives(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["replica"]: count
        for labels, count in series(samples, "ray_um_lives_total", application="um_r").items()
    }


def _replaced(handle: Any, old: str) -> str:
    """Count on the deployment until a replica other than ``old`` answers; its tag."""

    def attempt() -> str:
        try:
            return str(handle.count.remote().result(timeout_s=5))
        except Exception:
            return old

    return eventually(attempt, lambda tag: tag != old, timeout_s=30)


def test_replaced_replica_series_disappear_and_counters_never_go_back(backend: str) -> None:
    handle = serve.run(Replaceable.bind(), name="um_r", route_prefix="/r", backend=backend)
    seen = 0.0
    for _ in range(5):
        first = handle.count.remote().result(timeout_s=10)
        lives = _lives(scrape())
        assert lives.get(first, 0) >= seen  # a counter never goes back while its replica lives
        seen = lives.get(first, 0)
    assert _lives(eventually(scrape, lambda s: _lives(s).get(first) == 5)) == {first: 5}

    handle.fall_ill.remote().result(timeout_s=10)  # replaced after a failed health check
    second = _replaced(handle, first)
    assert eventually(
        lambda: _lives(scrape()), lambda lives: first not in lives and second in lives
    ) == {second: 1}


def test_dead_replica_series_disappear(remote_backend: str) -> None:
    handle = serve.run(Replaceable.bind(), name="um_r", route_prefix="/r", backend=remote_backend)
    first = handle.count.remote().result(timeout_s=10)
    assert first in _lives(eventually(scrape, lambda s: first in _lives(s)))
    with pytest.raises(Exception):  # noqa: B017 - the replica dies under the call
        handle.die.remote().result(timeout_s=10)
    second = _replaced(handle, first)
    assert eventually(
        lambda: _lives(scrape()), lambda lives: first not in lives and second in lives
    ) == {second: 1}
