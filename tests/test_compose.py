"""The deployment files, checked without a Docker engine: docker-compose.yml parsed with PyYAML and
the Dockerfile read line by line. Their commands must be the ones in ``shared/stack.py``, which the
integration tests run (``realscore worker`` through ``shared.cli``, Flower through
``flower_command``)."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from shared import stack
from shared.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def _unescape(compose_text: str) -> str:
    """What the container sees: compose turns ``$$`` into ``$``."""
    return compose_text.replace("$$", "$")


def test_the_stack_has_its_services(services: dict) -> None:
    assert {"redis", "worker", "flower", "minio"} <= set(services)
    for name in ("redis", "worker", "flower", "minio"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_redis_persists_and_never_evicts(compose: dict, services: dict) -> None:
    redis = services["redis"]
    command = " ".join(_command(redis))
    assert re.search(r"--appendonly\s+yes", command)
    assert re.search(r"--maxmemory-policy\s+noeviction", command)
    # The policy does nothing without a limit (the default, 0, means none on 64-bit builds).
    arguments = _command(redis)
    limit = arguments[arguments.index("--maxmemory") + 1]
    default = re.fullmatch(r"\$\{REDIS_MAXMEMORY:-(\d+)(b|kb|mb|gb)?\}", limit, re.IGNORECASE)
    assert default, f"--maxmemory should be ${{REDIS_MAXMEMORY:-SIZE}}, got {limit!r}"
    assert int(default.group(1)) > 0
    volume = next(v for v in redis["volumes"] if v.split(":")[1] == "/data")
    assert volume.split(":")[0] in compose["volumes"]  # a named volume, not the container's layer
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_worker_runs_realscore_worker_on_a_reserved_gpu(services: dict) -> None:
    worker = services["worker"]
    command = _command(worker)
    assert command[:2] == ["realscore", "worker"]
    assert command == stack.worker_command("-n", stack.WORKER_NODE)
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["build"]["context"] == "."
    assert {"redis", "minio"} <= set(worker["depends_on"])


def test_realscore_worker_is_what_the_tests_start() -> None:
    """Compose's `realscore` is the console script the tests run as `python -m shared.cli`."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["realscore"] == "shared.cli:main"
    from tests.processes import WorkerProcess

    argv = WorkerProcess({}, Path("unused.log")).args
    assert argv[1:4] == ["-m", "shared.cli", "worker"]
    # Flower is installable without the worker extra, and comes with the test tools.
    assert any(dep.startswith("flower") for dep in project["optional-dependencies"]["monitor"])
    assert any(dep.startswith("flower") for dep in project["optional-dependencies"]["dev"])


def test_worker_healthcheck_pings_its_own_node(services: dict) -> None:
    from celery.utils.nodenames import host_format

    from worker.serving.run_worker import celery_argv

    test = services["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"  # $HOSTNAME must be expanded by a shell
    assert _unescape(test[1]) == " ".join(stack.worker_ping_command("celery@$HOSTNAME"))
    # `-n celery@%h` reaches celery, and %h becomes the host name, i.e. the container's $HOSTNAME.
    node_args = _command(services["worker"])[2:]
    assert node_args == ["-n", stack.WORKER_NODE]
    assert celery_argv(Settings(), node_args)[-2:] == node_args
    assert host_format(stack.WORKER_NODE) == f"celery@{socket.gethostname()}"


def test_worker_reaches_redis_and_minio_with_real_settings(services: dict) -> None:
    env = _env(services["worker"])
    for name in ("REALSCORE_BROKER_URL", "REALSCORE_RESULT_BACKEND"):
        assert env[name].startswith("redis://:${REDIS_PASSWORD:?") and env[name].endswith("@redis:6379/0")
    assert env["REALSCORE_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio = _env(services["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    # Every REALSCORE_* variable names a real setting (a typo would be silently ignored).
    fields = set(Settings.model_fields)
    for service in services.values():
        for key in _env(service):
            if key.startswith(ENV_PREFIX):
                assert key[len(ENV_PREFIX):].lower() in fields, key


def test_redis_and_flower_are_private_and_ask_for_a_password(services: dict) -> None:
    # Every published port binds the loopback interface only.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    redis = services["redis"]
    arguments = _command(redis)
    password = arguments[arguments.index("--requirepass") + 1]
    assert password.startswith("${REDIS_PASSWORD:?"), "compose must refuse to run Redis without a password"
    assert _env(redis)["REDISCLI_AUTH"] == password  # the healthcheck's redis-cli authenticates
    for service in (services["worker"], services["flower"]):
        assert f":{password}@redis:6379/" in _env(service)["REALSCORE_BROKER_URL"]


def test_worker_names_its_s3_buckets(services: dict) -> None:
    import json

    from shared.buckets import is_plain_bucket

    buckets = json.loads(_env(services["worker"])["REALSCORE_S3_BUCKETS"])
    assert buckets and all(is_plain_bucket(name) for name in buckets)
    assert "media" in buckets  # the bucket minio-init creates
    assert Settings(s3_buckets=buckets).s3_buckets == buckets


def test_weights_are_mounted_read_only(services: dict) -> None:
    volumes = services["worker"]["volumes"]
    assert "./weights:/app/weights:ro" in volumes
    assert _env(services["worker"])["REALSCORE_HEAD_WEIGHTS"].startswith("/app/weights/")


def test_flower_runs_the_tested_command_behind_basic_auth(services: dict) -> None:
    flower = services["flower"]
    assert _command(flower) == stack.flower_command(port=stack.FLOWER_PORT, address="0.0.0.0")
    assert any(str(p).split(":")[-2:] == ["5555", "5555"] for p in flower["ports"])
    env = _env(flower)
    auth = env[stack.FLOWER_AUTH_ENV]
    user, _, password = auth.partition("}:")  # ${FLOWER_USER:-admin}:${FLOWER_PASSWORD:?...}
    assert user.startswith("${FLOWER_USER")
    assert password.startswith("${FLOWER_PASSWORD:?"), "compose must refuse to run Flower without a password"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert env["REALSCORE_BROKER_URL"] == _env(services["worker"])["REALSCORE_BROKER_URL"]


def test_minio_serves_s3_and_its_console(services: dict) -> None:
    minio = services["minio"]
    assert "server" in _command(minio) and "--console-address" in _command(minio)
    published = {str(p).split(":")[-1] for p in minio["ports"]}
    assert {"9000", "9001"} <= published


# Dockerfile -----------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def _stages(rows: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in rows:
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else parts[0]
            stages[current] = []
        stages[current].append((word, rest))
    return stages


def test_dockerfile_builds_a_slim_non_root_worker() -> None:
    import json

    rows = _instructions((ROOT / "Dockerfile").read_text())
    assert rows[0][0] == "FROM" and re.fullmatch(r"python:3\.\d+-slim(\s+AS\s+\w+)?", rows[0][1], re.I)
    stages = _stages(rows)
    final = list(stages)[-1]  # `docker build .` builds the last stage: the worker
    worker = stages[final]
    runs = [rest for word, rest in worker if word == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if "pip install" in run and "TORCH" in run.upper())
    package_at = next(i for i, run in enumerate(runs) if re.search(r"pip install\s+'\.\[worker\]'", run))
    assert torch_at < package_at  # torch's big layer is cached across code changes
    users = [rest for word, rest in worker if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    cmd = [rest for word, rest in worker if word in ("CMD", "ENTRYPOINT")]
    assert json.loads(cmd[-1])[:2] == ["realscore", "worker"]
    copied = " ".join(rest for word, rest in rows if word in ("COPY", "ADD"))
    assert "weights" not in copied  # mounted, not baked
    monitor_cmd = [rest for word, rest in stages["monitor"] if word == "CMD"]
    assert json.loads(monitor_cmd[-1]) == stack.flower_command()


def test_dockerignore_keeps_weights_and_venv_out_of_the_build() -> None:
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"weights", ".venv", ".git"} <= ignored
