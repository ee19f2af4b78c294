"""Shared helpers for the chart tests: the chart loaded once through the real Helm library
(helm-python-sdk, Helm v4 as a C library; no helm binary), rendering, an offline
`helm install --dry-run=client`, and the operator's own statement of the permissions it
needs (`audience-token-operator rbac`)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "audience-token-operator"
RELEASE = "ato"
RELEASE_NAMESPACE = "ato-system"


@pytest.fixture(scope="session")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render_raw(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    namespace: str = RELEASE_NAMESPACE,
    name: str = RELEASE,
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` renders it (values validated
    against values.schema.json first)."""
    return chart.render(values or {}, name=name, namespace=namespace, is_install=True)


def render(
    chart: helm.Chart,
    values: dict[str, Any] | None = None,
    *,
    namespace: str = RELEASE_NAMESPACE,
    name: str = RELEASE,
) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    objects = []
    for path, text in sorted(render_raw(chart, values, namespace=namespace, name=name).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}: not a mapping: {doc!r}"
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: no apiVersion/kind"
            objects.append(doc)
    return objects


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    rendered = render_raw(chart, values)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def install_dry_run(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """`helm install --dry-run=client`: Helm's install action, offline (release storage in
    memory; a client-only dry run contacts no API server, and the one configured is a
    closed loopback port)."""
    with helm.Config(
        kube_apiserver="http://127.0.0.1:9",
        namespace=RELEASE_NAMESPACE,
        storage_driver="memory",
    ) as cfg:
        return cfg.install(chart, RELEASE, values or {}, dry_run="client", namespace=RELEASE_NAMESPACE)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container_args(objects: list[dict[str, Any]]) -> list[str]:
    deployment = one(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


def run_operator(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """Runs the operator binary: ATO_BIN if set, else `cargo run` from the repository root
    (no rebuild after `cargo test`, which builds the same binary)."""
    binary = os.environ.get("ATO_BIN")
    if binary:
        command = [binary, *args]
    else:
        command = [
            "cargo", "run", "--locked", "--quiet", "--bin", "audience-token-operator", "--", *args,
        ]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@functools.lru_cache(maxsize=None)
def operator_rbac(
    namespace: str | None,
    operator_namespace: str,
    cluster_resource_namespace: str | None,
    leader_elect: bool,
) -> tuple[dict[str, Any], ...]:
    """The operator's own statement of what it needs: the rules printed by
    `audience-token-operator rbac`."""
    args = ["rbac", "--operator-namespace", operator_namespace]
    if namespace is not None:
        args += ["--namespace", namespace]
    if cluster_resource_namespace is not None:
        args += ["--cluster-resource-namespace", cluster_resource_namespace]
    if leader_elect:
        args.append("--leader-elect")
    result = run_operator(args)
    assert result.returncode == 0, (
        f"audience-token-operator {' '.join(args)} exited {result.returncode}:\n"
        f"{result.stderr[-4000:]}"
    )
    statement = json.loads(result.stdout)
    return tuple(statement["rules"])
