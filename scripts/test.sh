#!/usr/bin/env bash
# Runs every test: unit tests, the OAuth client against a real oidc-provider, the operator
# against the Kubernetes API double, CRD/CEL checks, and tests/e2e (skipped unless
# E2E_KUBECONFIG is set), the Helm chart's tests (tests/helm), and scripts/quickstart.sh's
# tests (tests/quickstart, with stubs for the cluster). Needs Rust, Node.js >= 20 and npm,
# and Python >= 3.10 with venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# The test authorization server (oidc-provider) from the committed lock file.
npm ci --prefix tests/oidc-server --no-audit --no-fund --loglevel=error

# The Helm chart's tests (tests/helm) use the real Helm library from PyPI (helm-python-sdk),
# installed into a virtualenv under target/: that works as root on a fresh machine, whether
# python3 is the machine's own or Debian's (which refuses system-wide pip installs, PEP 668).
HELM_VENV=target/helm-venv
if ! "$HELM_VENV/bin/python" -c '' 2>/dev/null; then
  python3 -m venv --clear "$HELM_VENV"
fi
# The quickstart's tests (tests/quickstart) use the same virtualenv, with ShellCheck added.
"$HELM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r tests/helm/requirements.txt -r tests/quickstart/requirements.txt

cargo test --locked --all-targets "$@"

# Chart lint/render/schema/RBAC tests; the RBAC test asks the binary built above
# (`audience-token-operator rbac`) what it needs.
# The binary `cargo test` just built (a `cargo run` would rebuild it with other features).
ATO_BIN="$PWD/target/debug/audience-token-operator" "$HELM_VENV/bin/python" -m pytest -q tests/helm

# scripts/quickstart.sh: shellcheck, --help, down, and up/down against stubs for the cluster,
# kind and the operator, with the real test authorization server (no cluster needed).
"$HELM_VENV/bin/python" -m pytest -q tests/quickstart
