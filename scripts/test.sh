#!/usr/bin/env bash
# Runs every test: unit tests, the OAuth client against a real oidc-provider, the operator
# against the Kubernetes API double, CRD/CEL checks, and tests/e2e (skipped unless
# E2E_KUBECONFIG is set). Needs Rust, Node.js >= 20 and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

# The test authorization server (oidc-provider) from the committed lock file.
npm ci --prefix tests/oidc-server --no-audit --no-fund --loglevel=error

cargo test --locked --all-targets "$@"
