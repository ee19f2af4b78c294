"""The chart's RBAC grants its ServiceAccount exactly what the operator says it needs
(`audience-token-operator rbac`), no more and no less, in both modes, with and without
leader election. Both sides are expanded into (namespace, apiGroup, resource, verb)
tuples, namespace "*" meaning cluster-wide."""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import RELEASE_NAMESPACE, container_args, of_kind, operator_rbac, render

CLUSTER_WIDE = "*"

Tuple = tuple[str, str, str, str]

CASES: dict[str, dict[str, Any]] = {
    "cluster-wide": {},
    "cluster-wide, no leader election": {"leaderElection": {"enabled": False}},
    "cluster-wide, other cluster resource namespace": {"clusterResourceNamespace": "shared-creds"},
    "team-a": {"watchNamespace": "team-a"},
    "team-a, no leader election": {"watchNamespace": "team-a", "leaderElection": {"enabled": False}},
    "team-a, cluster resources in team-a": {
        "watchNamespace": "team-a",
        "clusterResourceNamespace": "team-a",
    },
    "team-a, other cluster resource namespace": {
        "watchNamespace": "team-a",
        "clusterResourceNamespace": "shared-creds",
    },
    "default namespace": {"watchNamespace": "default"},
    "own namespace": {"watchNamespace": RELEASE_NAMESPACE},
}


def expand_rule(rule: dict[str, Any], namespace: str) -> set[Tuple]:
    # resourceNames would narrow a grant; the operator's statement has none, and a tuple
    # comparison would silently ignore them, so there must be none.
    assert not rule.get("resourceNames"), rule
    assert not rule.get("nonResourceURLs"), rule
    return {
        (namespace, group, resource, verb)
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


def chart_grants(objects: list[dict[str, Any]], sa_name: str, sa_namespace: str) -> set[Tuple]:
    """What the rendered bindings grant the ServiceAccount: each binding whose subjects
    include it, expanded through the role it references (which must be rendered too)."""
    cluster_roles = {o["metadata"]["name"]: o for o in of_kind(objects, "ClusterRole")}
    roles = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o for o in of_kind(objects, "Role")
    }
    subject = {"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}
    grants: set[Tuple] = set()
    for binding in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding"):
        if subject not in binding.get("subjects", []):
            continue
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        if binding["kind"] == "ClusterRoleBinding":
            assert ref["kind"] == "ClusterRole"
            role, scope = cluster_roles[ref["name"]], CLUSTER_WIDE
        else:
            scope = binding["metadata"]["namespace"]
            if ref["kind"] == "ClusterRole":
                role = cluster_roles[ref["name"]]
            else:
                role = roles[(scope, ref["name"])]
        for rule in role["rules"]:
            grants |= expand_rule(rule, scope)
    return grants


def operator_needs(statement: tuple[dict[str, Any], ...]) -> set[Tuple]:
    return {
        (rule["namespace"] or CLUSTER_WIDE, rule["apiGroup"], rule["resource"], verb)
        for rule in statement
        for verb in rule["verbs"]
    }


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, f"--{name} given twice: {args}"
    return values[0] if values else None


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_rbac_equals_what_the_operator_says_it_needs(chart, values):
    objects = render(chart, values)
    deployment = of_kind(objects, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    args = container_args(objects)
    # Ask the operator about the very flags the chart runs it with; it runs in the release
    # namespace (POD_NAMESPACE), where its Lease lives.
    statement = operator_rbac(
        flag(args, "namespace"),
        RELEASE_NAMESPACE,
        flag(args, "cluster-resource-namespace"),
        "--leader-elect" in args,
    )
    needed = operator_needs(statement)
    granted = chart_grants(objects, pod["serviceAccountName"], deployment["metadata"]["namespace"])
    assert granted == needed, (
        f"chart grants but operator does not need: {sorted(granted - needed)}\n"
        f"operator needs but chart does not grant: {sorted(needed - granted)}"
    )


def test_expansion_of_the_documented_contract(chart):
    """The expansion itself, against the contract written out by hand (so that a broken
    expansion cannot make both sides agree on nonsense)."""
    objects = render(chart, {"watchNamespace": "team-a"})
    granted = chart_grants(objects, "ato-audience-token-operator", RELEASE_NAMESPACE)
    g = "audiencetoken.io"
    expected = {
        ("*", g, "clustertokenissuers", "list"),
        ("*", g, "clustertokenissuers", "watch"),
        ("*", g, "clustertokenissuers/status", "patch"),
        ("*", "", "namespaces", "list"),
        ("*", "", "namespaces", "watch"),
        ("team-a", g, "audiencetokens", "list"),
        ("team-a", g, "audiencetokens", "watch"),
        ("team-a", g, "audiencetokens/status", "patch"),
        ("team-a", g, "tokenissuers", "list"),
        ("team-a", g, "tokenissuers", "watch"),
        ("team-a", g, "tokenissuers/status", "patch"),
        *{("team-a", "", "secrets", v) for v in ["get", "list", "watch", "create", "update", "patch"]},
        ("team-a", "events.k8s.io", "events", "create"),
        ("team-a", "events.k8s.io", "events", "patch"),
        (RELEASE_NAMESPACE, "", "secrets", "get"),
        (RELEASE_NAMESPACE, "", "secrets", "create"),
        (RELEASE_NAMESPACE, "", "secrets", "update"),
        ("default", "events.k8s.io", "events", "create"),
        ("default", "events.k8s.io", "events", "patch"),
        (RELEASE_NAMESPACE, "coordination.k8s.io", "leases", "get"),
        (RELEASE_NAMESPACE, "coordination.k8s.io", "leases", "create"),
        (RELEASE_NAMESPACE, "coordination.k8s.io", "leases", "patch"),
    }
    assert granted == expected


def test_a_binding_for_another_subject_grants_our_account_nothing(chart):
    objects = render(chart)
    assert chart_grants(objects, "someone-else", RELEASE_NAMESPACE) == set()
    assert chart_grants(objects, "ato-audience-token-operator", "other-namespace") == set()


@pytest.mark.parametrize("values", CASES.values(), ids=CASES.keys())
def test_no_wildcards_no_deletion_no_privilege_escalation(chart, values):
    objects = render(chart, values)
    rbac = [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
    assert rbac, "no RBAC rendered"
    for o in rbac:
        for rule in o.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                for item in rule.get(field, []):
                    assert "*" not in item, f"{o['kind']} {o['metadata']['name']}: {field} {item!r}"
            verbs = set(rule["verbs"])
            assert not verbs & {"delete", "deletecollection"}, rule
            assert not verbs & {"escalate", "bind", "impersonate"}, rule
        if o["kind"] in ("ClusterRole", "Role"):
            assert "aggregationRule" not in o
    # No "*" anywhere in the RBAC objects' text either.
    for o in rbac:
        assert not re.search(r"\*", repr(o.get("rules", []))), o


def test_roles_per_namespace_in_single_namespace_mode(chart):
    objects = render(chart, {"watchNamespace": "team-a"})
    assert sorted(r["metadata"]["namespace"] for r in of_kind(objects, "Role")) == [
        RELEASE_NAMESPACE,
        "default",
        "team-a",
    ]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(objects, "RoleBinding")) == [
        RELEASE_NAMESPACE,
        "default",
        "team-a",
    ]
    # Objects outside the release namespace carry the release namespace in their name, so
    # two releases of the same name in different namespaces do not claim the same object.
    for o in of_kind(objects, "ClusterRole") + of_kind(objects, "Role"):
        if o["metadata"].get("namespace") != RELEASE_NAMESPACE:
            assert o["metadata"]["name"].endswith(f"-{RELEASE_NAMESPACE}")


def test_rbac_can_be_left_to_the_user(chart):
    objects = render(chart, {"rbac": {"create": False}})
    assert not [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io/")]
