"""The chart: lint, rendering, schema, hardening, probes, leader election, monitoring, CRDs."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import helm_python as helm
import pytest
import yaml

from conftest import (
    CHART_DIR,
    RELEASE,
    RELEASE_NAMESPACE,
    REPO,
    container_args,
    install_dry_run,
    notes,
    of_kind,
    one,
    render,
    run_operator,
)

FULLNAME = f"{RELEASE}-audience-token-operator"
SELECTOR = {
    "app.kubernetes.io/name": "audience-token-operator",
    "app.kubernetes.io/instance": RELEASE,
}

# Value sets rendered by the scenario-wide checks below.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "single-namespace": {"watchNamespace": "team-a"},
    "three-replicas": {"replicaCount": 3},
    "no-leader-election": {"leaderElection": {"enabled": False}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    },
}


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            specs.append(o["spec"]["template"]["spec"])
        elif o["kind"] == "Pod":
            specs.append(o["spec"])
        elif o["kind"] == "CronJob":
            specs.append(o["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return specs


# --- lint -----------------------------------------------------------------------------


def lint_problems(report: dict[str, Any]) -> list[Any]:
    """Warnings and errors (severity >= 2) and hard errors of a lint report."""
    return [m for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])


@pytest.mark.parametrize(
    "values",
    [None, {"watchNamespace": "team-a"}, {"replicaCount": 3}],
    ids=["defaults", "single-namespace", "three-replicas"],
)
def test_lint_passes_strict(values):
    report = helm.lint(CHART_DIR, values, strict=True, namespace=RELEASE_NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert lint_problems(report) == []


def test_lint_reports_schema_violations():
    report = helm.lint(CHART_DIR, {"replicas": 2}, strict=True, namespace=RELEASE_NAMESPACE)
    assert any("replicas" in str(p) for p in lint_problems(report)), report


# --- CRDs -------------------------------------------------------------------------------


def test_chart_crds_are_the_top_level_crds_byte_for_byte(chart):
    top = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    packaged = {p.name: p.read_bytes() for p in sorted((CHART_DIR / "crds").iterdir())}
    assert set(top) == {"audiencetokens.yaml", "clustertokenissuers.yaml", "tokenissuers.yaml"}
    assert set(packaged) == set(top), "charts/audience-token-operator/crds/ has other files"
    for name in top:
        assert packaged[name] == top[name], (
            f"charts/audience-token-operator/crds/{name} differs from crds/{name}: "
            "cp crds/*.yaml charts/audience-token-operator/crds/"
        )
    # And Helm sees them as the chart's CRDs.
    loaded = {yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds}
    assert loaded == {
        "audiencetokens.audiencetoken.io",
        "tokenissuers.audiencetoken.io",
        "clustertokenissuers.audiencetoken.io",
    }


# --- defaults ---------------------------------------------------------------------------


def test_default_render(chart):
    objects = render(chart)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    )
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "audience-token-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "audience-token-operator-0.1.0"
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert "namespace" in o["metadata"], f"{o['kind']} without namespace"

    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == FULLNAME
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    pod = deployment["spec"]["template"]
    assert SELECTOR.items() <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["serviceAccountName"] == FULLNAME
    assert spec["automountServiceAccountToken"] is True
    assert spec["terminationGracePeriodSeconds"] == 30
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/audience-token-operator/audience-token-operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in container, "the image's ENTRYPOINT is the binary"
    assert container["args"] == [
        "run",
        "--metrics-addr=0.0.0.0:8080",
        "--health-addr=0.0.0.0:8081",
        "--concurrency=16",
        "--worker-threads=1",
        "--log-format=text",
        "--leader-elect",
        f"--leader-elect-lease-name={FULLNAME}",
        "--leader-elect-lease-duration=15s",
        f"--cluster-resource-namespace={RELEASE_NAMESPACE}",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "RUST_LOG" not in env
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 8080,
        "health": 8081,
    }
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},
    }

    account = one(objects, "ServiceAccount")["metadata"]
    assert (account["name"], account["namespace"]) == (FULLNAME, RELEASE_NAMESPACE)

    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == SELECTOR
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert of_kind(objects, "PodDisruptionBudget") == []
    assert of_kind(objects, "ServiceMonitor") == []
    assert of_kind(objects, "PrometheusRule") == []


def test_single_namespace_args(chart):
    args = container_args(render(chart, {"watchNamespace": "team-a"}))
    assert "--namespace=team-a" in args
    assert f"--cluster-resource-namespace={RELEASE_NAMESPACE}" in args
    args = container_args(
        render(chart, {"watchNamespace": "team-a", "clusterResourceNamespace": "shared"})
    )
    assert "--cluster-resource-namespace=shared" in args
    assert not any(a.startswith("--namespace") for a in container_args(render(chart)))


def test_values_reach_the_container(chart):
    objects = render(
        chart,
        {
            "concurrency": 64,
            "logFormat": "json",
            "logLevel": "debug",
            "extraArgs": ["--some-flag=x"],
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
            "metrics": {"port": 9090},
            "health": {"port": 9091},
            "leaderElection": {"leaseDuration": "30s"},
            "image": {"tag": "v9"},
            "imagePullSecrets": [{"name": "regcred"}],
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"a": "b"},
            "podLabels": {"team": "platform"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "nodeSelector": {"pool": "system"},
        },
    )
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert "--concurrency=64" in args and "--log-format=json" in args
    assert "--issuance-events=false" not in args, "on by default: no flag"
    assert "--worker-threads=3" in container_args(render(chart, {"workerThreads": 3}))
    assert "--issuance-events=false" in container_args(render(chart, {"issuanceEvents": False}))
    assert "--metrics-addr=0.0.0.0:9090" in args and "--health-addr=0.0.0.0:9091" in args
    assert "--leader-elect-lease-duration=30s" in args
    assert args[-1] == "--some-flag=x"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RUST_LOG"] == "debug" and env["HTTPS_PROXY"] == "http://proxy:3128"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 9090,
        "health": 9091,
    }
    assert container["image"].endswith(":v9")
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["tolerations"] == [{"key": "k", "operator": "Exists"}]
    # Maps merge with the defaults, as with any Helm chart.
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "system"}
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "platform"


def test_image_digest_wins_over_tag(chart):
    digest = "sha256:" + "ab" * 32
    objects = render(chart, {"image": {"tag": "v9", "digest": digest}})
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/audience-token-operator/audience-token-operator@{digest}"


def test_topology_spread_constraints_default_to_the_pod_selector(chart):
    constraint = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    objects = render(chart, {"replicaCount": 2, "topologySpreadConstraints": [constraint]})
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert spec["topologySpreadConstraints"] == [
        {**constraint, "labelSelector": {"matchLabels": SELECTOR}}
    ]


def test_existing_service_account(chart):
    objects = render(chart, {"serviceAccount": {"create": False, "name": "ops"}})
    assert of_kind(objects, "ServiceAccount") == []
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "ops", "namespace": RELEASE_NAMESPACE}
        ]


# --- hardening and probes, in every scenario --------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_pods_are_hardened(chart, values):
    specs = pod_specs(render(chart, values))
    assert specs, "no pod rendered"
    for spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] == 65532
        assert pod_sc["runAsGroup"] == 65532
        assert pod_sc["fsGroup"] == 65532
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is True
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")


@pytest.mark.parametrize("values", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_probes_use_the_named_health_port(chart, values):
    (spec,) = pod_specs(render(chart, values))
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 8081 and ports["metrics"] == 8080
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert "--health-addr=0.0.0.0:8081" in container["args"]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespace": "team-a", "leaderElection": {"enabled": False}, "logFormat": "json"},
        {"clusterResourceNamespace": "shared", "concurrency": 1000, "workerThreads": 4, "leaderElection": {"leaseDuration": "1m30s"}, "issuanceEvents": False},
    ],
    ids=["defaults", "single-namespace-json", "tuned"],
)
def test_the_operator_accepts_the_rendered_arguments(chart, values):
    """`audience-token-operator run` parses the chart's arguments (a flag it does not know
    or a malformed value exits 2 before anything else). With no cluster configuration it
    then stops at the config lookup instead."""
    args = container_args(render(chart, values))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    with tempfile.TemporaryDirectory() as scratch:
        env["KUBECONFIG"] = os.path.join(scratch, "no-kubeconfig")
        # Loopback ports of our own, not the rendered 0.0.0.0 ones.
        local = [
            "--metrics-addr=127.0.0.1:0" if a.startswith("--metrics-addr=")
            else "--health-addr=127.0.0.1:0" if a.startswith("--health-addr=")
            else a
            for a in args
        ]
        result = run_operator(local, env=env, timeout=600)
    assert result.returncode not in (0, 2), (result.returncode, result.stderr[-2000:])
    assert "unexpected argument" not in result.stderr
    assert "invalid value" not in result.stderr
    assert "kubeconfig" in result.stderr, result.stderr[-2000:]


# --- replicas and leader election -------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "leader"),
    [
        ({}, True),
        ({"leaderElection": {"enabled": True}}, True),
        ({"leaderElection": {"enabled": False}}, False),
        ({"replicaCount": 3}, True),
        ({"watchNamespace": "team-a", "leaderElection": {"enabled": False}}, False),
    ],
)
def test_leader_elect_flag_exactly_when_enabled(chart, values, leader):
    objects = render(chart, values)
    args = container_args(objects)
    assert args.count("--leader-elect") == (1 if leader else 0)
    assert any(a.startswith("--leader-elect-lease-duration=") for a in args) == leader
    # One Lease per release, so two releases in one namespace do not share a leader.
    assert any(a.startswith("--leader-elect-lease-name=") for a in args) == leader
    strategy = one(objects, "Deployment")["spec"]["strategy"]
    if leader:
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    else:
        assert strategy == {"type": "Recreate"}, "two pods must never both write"


def test_three_replicas_get_a_pod_disruption_budget(chart):
    objects = render(chart, {"replicaCount": 3})
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    assert "--leader-elect" in container_args(objects)
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}


def test_several_replicas_without_leader_election_fail(chart):
    values = {"replicaCount": 2, "leaderElection": {"enabled": False}}
    with pytest.raises(helm.HelmRenderError) as err:
        render(chart, values)
    assert "replicaCount is 2 but leaderElection.enabled is false" in str(err.value)
    with pytest.raises(helm.HelmError) as err:
        install_dry_run(chart, values)
    assert "leaderElection.enabled" in str(err.value)


# --- schema -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": 2}, "replicas"),
        ({"logFormat": "xml"}, "logFormat"),
        ({"replicaCount": 0}, "replicaCount"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1001}, "concurrency"),
        ({"workerThreads": 0}, "workerThreads"),
        ({"image": {"tagg": "v1"}}, "tagg"),
        ({"leaderElection": {"enabled": "yes"}}, "enabled"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
    ],
)
def test_schema_rejects_bad_values(chart, values, complaint):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(values)
    assert complaint in str(err.value)
    # `helm template` and `helm install` refuse them too.
    with pytest.raises(helm.HelmValuesError):
        render(chart, values)
    with pytest.raises(helm.HelmError) as err:
        install_dry_run(chart, values)
    assert complaint in str(err.value)


def test_schema_accepts_the_defaults_and_every_documented_value(chart):
    chart.validate_schema({})
    chart.validate_schema(chart.values)
    assert chart.schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert chart.schema["additionalProperties"] is False
    # Every default value is declared in the schema.
    def walk(values, schema, path):
        for key, value in values.items():
            props = schema.get("properties", {})
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict) and "properties" in props[key]:
                walk(value, props[key], f"{path}{key}.")
    walk(chart.values, chart.schema, "")


def test_install_dry_run_with_defaults(chart):
    release = install_dry_run(chart)
    assert release["name"] == RELEASE and release["namespace"] == RELEASE_NAMESPACE
    kinds = {d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Service"} <= kinds
    assert "kubectl explain audiencetoken.spec" in release["notes"]


# --- monitoring -------------------------------------------------------------------------


def test_service_monitor_only_when_enabled(chart):
    assert of_kind(render(chart), "ServiceMonitor") == []
    objects = render(
        chart,
        {
            "metrics": {
                "serviceMonitor": {
                    "enabled": True,
                    "interval": "30s",
                    "scrapeTimeout": "10s",
                    "labels": {"release": "prom"},
                    "namespace": "monitoring",
                }
            }
        },
    )
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s"
    assert endpoint["honorLabels"] is True
    # It selects the metrics Service, which exposes the port it scrapes.
    service = one(objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    # Interval and timeout are left to Prometheus unless set.
    (endpoint,) = one(render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}}), "ServiceMonitor")["spec"]["endpoints"]
    assert "interval" not in endpoint and "scrapeTimeout" not in endpoint


def test_service_monitor_needs_the_service(chart):
    with pytest.raises(helm.HelmRenderError, match="metrics.service.enabled"):
        render(chart, {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})
    assert of_kind(render(chart, {"metrics": {"service": {"enabled": False}}}), "Service") == []


def test_prometheus_rule(chart):
    assert of_kind(render(chart), "PrometheusRule") == []
    rule = one(render(chart, {"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert alerts["AudienceTokenExpiringSoon"]["expr"] == "audience_token_expiry_timestamp_seconds - time() < 300"
    assert alerts["AudienceTokenExpiringSoon"]["for"] == "2m"
    assert alerts["AudienceTokenNotReady"]["expr"] == "audience_token_ready == 0"
    assert alerts["AudienceTokenNotReady"]["for"] == "10m"
    assert alerts["AudienceTokenRenewalFailing"]["expr"] == "audience_token_failing == 1"
    # Prometheus templates pass through Helm untouched.
    assert "{{ $labels.namespace }}/{{ $labels.name }}" in alerts["AudienceTokenNotReady"]["annotations"]["summary"]


# --- NOTES ------------------------------------------------------------------------------


def test_notes(chart):
    text = notes(chart)
    for expected in [
        "cluster-wide",
        "kubectl explain audiencetoken.spec",
        "kubectl get audiencetokens -A",
        "kubectl describe audiencetoken <name>",
        "--field-selector reason=TokenRequestFailed",
        "helm upgrade` does not upgrade CRDs",
        "kubectl apply --server-side --force-conflicts -f charts/audience-token-operator/crds/",
        "audience-token-operator crds | kubectl apply --server-side --force-conflicts -f -",
    ]:
        assert expected in text, expected
    single = notes(chart, {"watchNamespace": "team-a"})
    assert 'single namespace: AudienceTokens, TokenIssuers and Secrets in "team-a"' in single
    assert "cluster-wide: AudienceTokens" not in single


def test_every_value_is_documented_in_the_chart_readme(chart):
    readme = (CHART_DIR / "README.md").read_text()

    def keys(values, prefix=""):
        for key, value in values.items():
            if isinstance(value, dict) and value and key not in (
                "podSecurityContext", "securityContext", "resources", "nodeSelector"
            ):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    missing = [k for k in keys(chart.values) if f"`{k}`" not in readme]
    assert missing == [], f"values missing from charts/audience-token-operator/README.md: {missing}"
