"""Rules that code, config files and the running controller share: each reads the same everywhere.

A route prefix, a replica count or a pydantic error is accepted, refused and
described the same way whether it comes from ``tandem.run()``, ``@deployment``,
``.options()``, a config file or a builder's arguments.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import tandem as serve
from tandem._private.app.config_file import apply_overrides, validate_config
from tandem._private.app.importing import build_app


@serve.deployment
def _ping() -> str:
    return "pong"


def _config(**app: Any) -> dict[str, Any]:
    return {"applications": [{"import_path": "greet:app", **app}]}


# -- num_replicas -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, 2.5, 0.0, "2", "many", [1]])
def test_bad_num_replicas_reads_the_same_in_code_and_in_config_files(value: Any) -> None:
    expected = f"must be an integer >= 1 or 'auto', got {value!r}"
    with pytest.raises(ValueError) as in_code:
        serve.deployment(_ping.func_or_class, num_replicas=value)
    assert f"Invalid option 'num_replicas' for deployment '_ping': {expected}." == str(
        in_code.value
    )
    with pytest.raises(ValueError) as in_options:
        _ping.options(num_replicas=value)
    assert expected in str(in_options.value)
    with pytest.raises(ValueError) as in_file:
        validate_config(_config(deployments=[{"name": "D", "num_replicas": value}]))
    assert f"applications[0].deployments[0].num_replicas: {expected}" in str(in_file.value)


@pytest.mark.parametrize("value", [1, 3, "auto"])
def test_good_num_replicas_is_taken_in_code_and_in_config_files(value: Any) -> None:
    assert _ping.options(num_replicas=value).num_replicas == value
    config = validate_config(_config(deployments=[{"name": "D", "num_replicas": value}]))
    assert config.applications[0].deployments[0].num_replicas == value


def test_whole_float_num_replicas_is_that_many_replicas_as_in_ray_serve() -> None:
    assert _ping.options(num_replicas=2.0).num_replicas == 2
    config = validate_config(_config(deployments=[{"name": "D", "num_replicas": 3.0}]))
    assert config.applications[0].deployments[0].num_replicas == 3


# -- route prefixes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("api", "must start with '/'"),
        ("/a b", "plain path"),
        ("/a?b", "plain path"),
        ("/{id}", "plain path"),
    ],
)
def test_a_bad_route_prefix_is_refused_the_same_by_run_and_config_files(
    prefix: str, words: str
) -> None:
    with pytest.raises(ValueError) as by_run:
        serve.run(_ping.bind(), route_prefix=prefix, backend="local")
    assert words in str(by_run.value)
    with pytest.raises(ValueError) as by_file:
        validate_config(_config(route_prefix=prefix))
    assert f"applications[0]: {by_run.value}" in str(by_file.value)
    assert serve.status().applications == {}


def test_config_files_spell_route_prefixes_as_run_does() -> None:
    assert validate_config(_config(route_prefix="/v1/")).applications[0].route_prefix == "/v1"
    assert validate_config(_config(route_prefix="/")).applications[0].route_prefix == "/"
    assert validate_config(_config(route_prefix=None)).applications[0].route_prefix is None


def test_a_config_file_cannot_give_two_applications_one_prefix_however_spelled() -> None:
    data = {
        "applications": [
            {"name": "a", "import_path": "greet:app", "route_prefix": "/v1"},
            {"name": "b", "import_path": "greet:app", "route_prefix": "/v1/"},
        ]
    }
    with pytest.raises(ValueError, match="route_prefix '/v1' is used by both 'a' and 'b'"):
        validate_config(data)


def test_a_running_application_keeps_its_prefix_from_another(backend: str) -> None:
    serve.run(_ping.bind(), name="first", route_prefix="/api/", backend=backend)
    with pytest.raises(ValueError) as info:
        serve.run(_ping.bind(), name="second", route_prefix="/api", backend=backend)
    assert str(info.value) == (
        "Route prefix '/api' is already used by application 'first'; choose another "
        "route_prefix or delete that application first."
    )
    serve.delete("first")
    serve.run(_ping.bind(), name="second", route_prefix="/api", backend=backend)
    assert serve.status().applications["second"].route_prefix == "/api"


# -- pydantic errors --------------------------------------------------------------


class _Args(BaseModel):
    sizes: list[int]


def _builder(args: _Args) -> Any:
    return _ping.bind()


def test_pydantic_errors_name_fields_the_same_way_everywhere() -> None:
    with pytest.raises(ValueError) as in_code:
        _ping.options(ray_actor_options={"num_cpus": "lots"})
    assert "Invalid option 'ray_actor_options.num_cpus' for deployment '_ping': " in str(
        in_code.value
    )
    with pytest.raises(ValueError) as in_file:
        validate_config(_config(deployments=[{"name": "D", "ray_actor_options": {"x": 1}}]))
    assert "applications[0].deployments[0].ray_actor_options.x: " in str(in_file.value)
    with pytest.raises(ValueError) as in_builder:
        build_app(_builder, {"sizes": [1, "two"]}, "mod:builder")
    assert "sizes[1]: " in str(in_builder.value)
    assert "Value error" not in str(in_builder.value)


# -- config-file fields tandem would otherwise ignore --------------------------------


@pytest.mark.parametrize(
    ("top", "words"),
    [
        ({"target_capacity": 50}, "target_capacity"),
        ({"grpc_options": {"grpc_port": 9000}}, "unknown gRPC option 'grpc_port'"),
    ],
)
def test_config_file_options_tandem_cannot_apply_are_refused(top: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        validate_config({**_config(), **top})


def test_config_file_without_grpc_servicers_or_with_external_scaler_is_taken() -> None:
    config = validate_config(
        {
            **_config(external_scaler_enabled=False),
            "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
            "target_capacity": None,
        }
    )
    assert config.applications[0].external_scaler_enabled is False
    # The control endpoint's scale request serves it (tests/controller/test_external_scaler.py).
    config = validate_config(_config(external_scaler_enabled=True))
    assert config.applications[0].external_scaler_enabled is True


def test_route_prefix_on_a_deployment_says_where_it_belongs() -> None:
    with pytest.raises(ValueError, match=r"route_prefix is not an option .*serve.run\(app"):
        serve.deployment(_ping.func_or_class, route_prefix="/x")
    with pytest.raises(ValueError, match="belongs to the application"):
        _ping.options(route_prefix="/x")


def test_request_router_settings_at_the_top_level_say_where_they_belong() -> None:
    # Ray Serve's early request-router releases took request_router_class= on the
    # deployment itself; it moved into request_router_config.
    with pytest.raises(ValueError, match=r"belongs in request_router_config"):
        serve.deployment(_ping.func_or_class, request_router_class="m:Router")
    with pytest.raises(ValueError, match=r"request_routing_stats_period_s=\.\.\."):
        _ping.options(request_routing_stats_period_s=1)


def test_config_file_overrides_take_router_and_placement_options() -> None:
    # Ray Serve's DeploymentSchema has them; they reach the deployment's options.
    config = validate_config(
        _config(
            deployments=[
                {
                    "name": "_ping",
                    "request_router_config": {"request_routing_stats_period_s": 3},
                    "placement_group_bundles": [{"CPU": 1}],
                    "placement_group_strategy": "PACK",
                }
            ]
        )
    )
    overrides = {d.name: d.options() for d in config.applications[0].deployments}
    app = apply_overrides(_ping.bind(), overrides, "default")
    options = app.deployment.deployment_options
    assert options.request_router_config is not None
    assert options.request_router_config.request_routing_stats_period_s == 3
    assert options.placement_group_strategy == "PACK"
    assert options.placement_group_bundles == [{"CPU": 1}]
    other = validate_config(_config(deployments=[{"name": "_ping", "max_replicas_per_node": 2}]))
    spread = apply_overrides(
        _ping.bind(), {d.name: d.options() for d in other.applications[0].deployments}, "default"
    )
    assert spread.deployment.deployment_options.max_replicas_per_node == 2
    with pytest.raises(ValueError, match="request_router_config"):
        apply_overrides(
            _ping.bind(),
            {"_ping": {"request_router_config": {"request_routing_stats_period_s": -1}}},
            "default",
        )
