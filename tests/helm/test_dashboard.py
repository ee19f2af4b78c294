"""The Grafana dashboard ConfigMap: off by default; when on, one ConfigMap that Grafana's
dashboard sidecar picks up, holding the repository's dashboard JSON byte for byte. (That
every query names an exported metric is checked by tests/dashboard.rs, against the
operator's own metrics.)"""

from __future__ import annotations

import json

import helm_python as helm
import pytest

from conftest import CHART_DIR, RELEASE, RELEASE_NAMESPACE, install_dry_run, of_kind, one, render

DASHBOARD = CHART_DIR / "dashboards" / "audience-token-operator.json"
DATA_KEY = "audience-token-operator.json"


def test_the_repository_json_is_a_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "audience-token-operator"
    assert dashboard["title"] == "audience-token-operator"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["panels"], "no panels"
    # Importable anywhere: no data source uid of one installation, only the variable.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "__inputs" not in dashboard, "the sidecar does not resolve __inputs"

    def datasources(node):
        if isinstance(node, dict):
            if isinstance(node.get("datasource"), dict):
                yield node["datasource"]
            for value in node.values():
                yield from datasources(value)
        elif isinstance(node, list):
            for value in node:
                yield from datasources(value)

    for source in datasources(dashboard["panels"] + dashboard["templating"]["list"]):
        assert source == {"type": "prometheus", "uid": "${datasource}"}, source


def test_off_by_default(chart):
    objects = render(chart)
    assert of_kind(objects, "ConfigMap") == []
    assert chart.values["grafanaDashboard"]["enabled"] is False


def test_enabled_renders_the_repository_json(chart):
    objects = render(chart, {"grafanaDashboard": {"enabled": True}})
    config_map = one(objects, "ConfigMap")
    metadata = config_map["metadata"]
    assert metadata["name"] == f"{RELEASE}-audience-token-operator-dashboard"
    assert metadata["namespace"] == RELEASE_NAMESPACE
    assert metadata["labels"]["grafana_dashboard"] == "1"
    assert metadata["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert "annotations" not in metadata
    assert list(config_map["data"]) == [DATA_KEY]
    text = config_map["data"][DATA_KEY]
    assert text == DASHBOARD.read_text(), "the ConfigMap must hold the file as it is"
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


def test_label_namespace_and_annotations_are_configurable(chart):
    values = {
        "grafanaDashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "label": "example.com/dashboard",
            "labelValue": "yes",
            "labels": {"team": "platform"},
            "annotations": {"grafana_folder": "Operators"},
        }
    }
    config_map = one(render(chart, values), "ConfigMap")
    metadata = config_map["metadata"]
    assert metadata["namespace"] == "monitoring"
    assert metadata["labels"]["example.com/dashboard"] == "yes"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["labels"]["team"] == "platform"
    assert metadata["annotations"] == {"grafana_folder": "Operators"}
    assert json.loads(config_map["data"][DATA_KEY])["uid"] == "audience-token-operator"


def test_enabled_lints_and_installs(chart):
    values = {"grafanaDashboard": {"enabled": True}}
    report = helm.lint(CHART_DIR, values, strict=True, namespace=RELEASE_NAMESPACE)
    assert [m for m in report["messages"] if m["severity"] >= 2] + list(report["errors"]) == []
    release = install_dry_run(chart, values)
    assert "kind: ConfigMap" in release["manifest"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"enable": True}, "enable"),
        ({"label": "not a label"}, "label"),
        ({"labelValue": 1}, "labelValue"),
        ({"namespace": "Monitoring"}, "namespace"),
    ],
)
def test_schema_rejects_bad_values(chart, values, complaint):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema({"grafanaDashboard": values})
    assert complaint in str(err.value)
