#!/usr/bin/env bash
# One command to see the operator work: see `scripts/quickstart.sh --help`.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

STATE=${QUICKSTART_STATE_DIR:-$REPO/.quickstart}
OPERATOR_ADDR=${QUICKSTART_OPERATOR_ADDR:-127.0.0.1:8081}
WAIT=${QUICKSTART_WAIT:-180}
CLUSTER_NAME=ato

# What examples/local creates (checked against the files by tests/quickstart).
NAMESPACE=shop
TOKEN=orders-api-token
ISSUER_PLACEHOLDER=http://127.0.0.1:PORT
DEPLOYMENT=token-reader
MOUNT=/var/run/secrets/orders-api
# Applied in this order: the namespace first, then what lives in it.
EXAMPLES=(namespace client-secret token-issuer audience-token deployment)

usage() {
  cat <<EOF
Usage: scripts/quickstart.sh [up|down|--help]

  up (the default)
      Uses the cluster of the current kubeconfig context; when none is reachable,
      creates a kind or k3d cluster named "$CLUSTER_NAME" (whichever is installed; kind
      if both). Installs the CRDs (crds/), starts the test authorization server
      (tests/oidc-server) and the operator (built with cargo) on this machine, applies
      examples/local with the server's URL, waits until the AudienceToken
      $NAMESPACE/$TOKEN is Ready, and prints the token's audience and scopes (from the
      Secret and the decoded JWT; never the token itself) and what the pod of
      deployment/$DEPLOYMENT sees in its mount. Running it again reuses what still runs.
  down
      Stops the server and the operator it started, deletes what it applied (the
      namespace only if it made it), the CRDs if it installed them, and the cluster if it
      created it; then removes its state directory. Without a previous up it does nothing.

Needs kubectl, jq, curl, Node.js >= 20.19 with npm, a Rust toolchain (unless
ATO_BIN is set), and kind or k3d when no cluster is reachable.

State (pids, logs, what was created): $STATE
  operator.log, oidc-server.log   the two processes' logs

Environment:
  ATO_BIN                    run this operator binary instead of building one
  QUICKSTART_OPERATOR_ADDR   where the operator serves /metrics, /healthz and /readyz
                             (default 127.0.0.1:8081)
  QUICKSTART_CLUSTER_TOOL    kind or k3d: which one creates the cluster, when one is needed
  QUICKSTART_WAIT            seconds to wait for the token and the pod (default 180)
  QUICKSTART_STATE_DIR       the state directory (default .quickstart/ in the repository)
EOF
}

say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
die() {
  printf 'quickstart: %s\n' "$*" >&2
  exit 1
}

need() {
  local tool=$1 why=$2
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (needed $why)"
}

# Polls "$@" every half second until it succeeds or $1 seconds have passed.
wait_until() {
  local timeout=$1
  shift
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
# Exited (a zombie not yet reaped by its new parent counts as exited).
gone() { ! kill -0 "$1" 2>/dev/null || [[ $(ps -o stat= -p "$1" 2>/dev/null) == *Z* ]]; }

# --- state: one small file per fact, in $STATE ----------------------------------------

record() { printf '%s\n' "$2" >"$STATE/$1"; }
recorded() { [[ -s $STATE/$1 ]] && cat "$STATE/$1"; }

# A process is "ours" when its pid still runs with the start time recorded when it was
# started and its command line names what was started (a pid can be reused).
start_time() { ps -o lstart= -p "$1" 2>/dev/null | tr -s ' ' || true; }
record_process() {
  local name=$1 pid=$2 marker=$3
  printf '%s\n%s\n%s\n' "$pid" "$(start_time "$pid")" "$marker" >"$STATE/$name.pid"
}
# Prints the recorded pid of $1 when that process is still the one started.
our_process() {
  local file=$STATE/$1.pid pid started marker
  [[ -s $file ]] || return 1
  { read -r pid && read -r started && read -r marker; } <"$file" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -n $started && $(start_time "$pid") == "$started" ]] || return 1
  # -ww: the whole command line (ps cuts it to the terminal's width when one is near).
  [[ $(ps -ww -o args= -p "$pid" 2>/dev/null || true) == *"$marker"* ]] || return 1
  printf '%s\n' "$pid"
}
stop_process() {
  local name=$1 pid
  [[ -e $STATE/$name.pid ]] || return 0
  if pid=$(our_process "$name"); then
    say "stopping the $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 15 gone "$pid"; then
      say "the $name did not stop within 15 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    say "the $name is not running any more (pid $(head -n1 "$STATE/$name.pid")): nothing to stop"
  fi
  rm -f "$STATE/$name.pid"
}

# --- the cluster ------------------------------------------------------------------------

k() { kubectl --context "$CONTEXT" "$@"; }
reachable() { kubectl --context "$1" --request-timeout=5s get --raw /version >/dev/null 2>&1; }

cluster_tool() {
  local tool
  for tool in ${QUICKSTART_CLUSTER_TOOL:-kind k3d}; do
    if command -v "$tool" >/dev/null 2>&1; then
      printf '%s\n' "$tool"
      return 0
    fi
  done
  return 1
}

cluster_exists() {
  case $1 in
    kind) kind get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME" ;;
    k3d) k3d cluster get "$CLUSTER_NAME" >/dev/null 2>&1 ;;
  esac
}

choose_cluster() {
  local current tool
  if CONTEXT=$(recorded context); then
    reachable "$CONTEXT" ||
      die "the context of the previous up, $CONTEXT, is not reachable: scripts/quickstart.sh down, then up again"
    say "using context $CONTEXT (as before)"
    return
  fi
  current=$(kubectl config current-context 2>/dev/null || true)
  if [[ -n $current ]] && reachable "$current"; then
    CONTEXT=$current
    say "using the current kubeconfig context: $CONTEXT"
  else
    if [[ -n $current ]]; then
      say "the current kubeconfig context, $current, does not reach a cluster"
    else
      say "kubectl has no current context"
    fi
    case ${QUICKSTART_CLUSTER_TOOL:-kind} in
      kind | k3d) ;;
      *) die "QUICKSTART_CLUSTER_TOOL must be kind or k3d, not $QUICKSTART_CLUSTER_TOOL" ;;
    esac
    tool=$(cluster_tool) || die "no cluster is reachable, and neither kind nor k3d is installed:" \
      "install kind or k3d (either needs Docker), or point kubectl at a cluster"
    CONTEXT=$tool-$CLUSTER_NAME
    if cluster_exists "$tool"; then
      # Made by someone else (or by hand): used, and left alone by down.
      say "using the existing $tool cluster $CLUSTER_NAME"
      case $tool in
        kind) kind export kubeconfig --name "$CLUSTER_NAME" ;;
        k3d) k3d kubeconfig merge "$CLUSTER_NAME" --kubeconfig-merge-default --kubeconfig-switch-context >/dev/null ;;
      esac
    else
      step "creating a $tool cluster named $CLUSTER_NAME"
      # Recorded first, so that down removes a cluster whose creation was interrupted.
      record cluster "$tool"
      case $tool in
        kind) kind create cluster --name "$CLUSTER_NAME" --wait 120s ;;
        k3d) k3d cluster create "$CLUSTER_NAME" --wait ;;
      esac
    fi
    wait_until 60 reachable "$CONTEXT" || die "the $tool cluster does not answer at context $CONTEXT"
  fi
  record context "$CONTEXT"
}

# --- the pieces -------------------------------------------------------------------------

install_crds() {
  step "installing the CRDs (crds/)"
  local before applied
  before=$(k get -f crds/ -o name --ignore-not-found)
  # Server-side, as for an upgrade (see README.md): CRDs a Helm release installed are
  # brought to this checkout's, which the operator run here needs.
  applied=$(k apply --server-side --force-conflicts -f crds/ -o name)
  printf '%s\n' "$applied" | while read -r line; do say "  $line"; done
  # The CRDs that were not there before the first up: down deletes only these.
  if [[ ! -e $STATE/crds-created ]]; then
    comm -13 <(printf '%s\n' "$before" | sort) <(printf '%s\n' "$applied" | sort) \
      | sed '/^$/d' >"$STATE/crds-created.new"
    mv "$STATE/crds-created.new" "$STATE/crds-created"
  fi
  k wait --for=condition=Established -f crds/ --timeout=60s >/dev/null
}

server_started_or_gone() { [[ -s $STATE/oidc-server.json ]] || gone "$1"; }
discovery_answers() {
  curl -fsS --max-time 2 "$1/.well-known/openid-configuration" >/dev/null 2>&1
}

start_oidc_server() {
  step "the test authorization server (tests/oidc-server)"
  local pid issuer
  if pid=$(our_process oidc-server) && issuer=$(recorded issuer) && discovery_answers "$issuer"; then
    say "already running at $issuer (pid $pid)"
    ISSUER=$issuer
    return
  fi
  stop_process oidc-server
  if [[ ! tests/oidc-server/node_modules/.package-lock.json -nt tests/oidc-server/package-lock.json ]]; then
    npm ci --prefix tests/oidc-server --no-audit --no-fund --loglevel=error
  fi
  rm -f "$STATE/oidc-server.json" "$STATE/issuer"
  # stdout gets one line, {"issuer":"http://127.0.0.1:<port>"} (a new port at each start).
  OIDC_SERVER_IGNORE_STDIN=1 nohup node tests/oidc-server/server.mjs \
    >"$STATE/oidc-server.json" 2>"$STATE/oidc-server.log" </dev/null &
  pid=$!
  record_process oidc-server "$pid" server.mjs
  if ! wait_until 60 server_started_or_gone "$pid" || [[ ! -s $STATE/oidc-server.json ]]; then
    tail -n 20 "$STATE/oidc-server.log" >&2 || true
    die "the test authorization server did not start (log: $STATE/oidc-server.log)"
  fi
  issuer=$(jq -r .issuer "$STATE/oidc-server.json")
  wait_until 30 discovery_answers "$issuer" ||
    die "$issuer/.well-known/openid-configuration does not answer (log: $STATE/oidc-server.log)"
  record issuer "$issuer"
  say "running at $issuer (pid $pid, log $STATE/oidc-server.log)"
  ISSUER=$issuer
}

operator_ready() { curl -fsS --max-time 2 "http://$OPERATOR_ADDR/readyz" >/dev/null 2>&1; }
operator_ready_or_gone() { operator_ready || gone "$1"; }

start_operator() {
  step "the operator, on this machine, with context $CONTEXT"
  local pid bin current
  if pid=$(our_process operator) && operator_ready; then
    say "already running (pid $pid), ready at http://$OPERATOR_ADDR/readyz"
    return
  fi
  stop_process operator
  # The operator has no --context: it uses the current context, which must be this one.
  current=$(kubectl config current-context 2>/dev/null || true)
  [[ $current == "$CONTEXT" ]] ||
    die "the current kubeconfig context is ${current:-(none)}, not $CONTEXT, which the quickstart uses:" \
      "kubectl config use-context $CONTEXT (or scripts/quickstart.sh down)"
  if curl -s --max-time 2 -o /dev/null "http://$OPERATOR_ADDR/"; then
    die "something already listens on $OPERATOR_ADDR: set QUICKSTART_OPERATOR_ADDR to a free address"
  fi
  if [[ -n ${ATO_BIN:-} ]]; then
    bin=$ATO_BIN
  else
    say "building it (cargo build --release; the first build takes several minutes)"
    cargo build --locked --release --bin audience-token-operator
    bin=${CARGO_TARGET_DIR:-target}/release/audience-token-operator
  fi
  [[ -x $bin ]] || die "$bin is not an executable"
  # Only the example's namespace: an operator already in that cluster keeps the others.
  # NO_COLOR: a log file without terminal colour codes.
  NO_COLOR=1 nohup "$bin" run --namespace "$NAMESPACE" \
    --metrics-addr "$OPERATOR_ADDR" --health-addr "$OPERATOR_ADDR" \
    >"$STATE/operator.log" 2>&1 </dev/null &
  pid=$!
  record_process operator "$pid" "$(basename "$bin")"
  if ! wait_until 120 operator_ready_or_gone "$pid" || ! operator_ready; then
    tail -n 20 "$STATE/operator.log" >&2 || true
    die "the operator did not become ready (log: $STATE/operator.log)"
  fi
  say "ready at http://$OPERATOR_ADDR/readyz (pid $pid, log $STATE/operator.log)"
}

apply_examples() {
  step "applying examples/local with issuerURL $ISSUER"
  local files=() name
  for name in "${EXAMPLES[@]}"; do files+=("examples/local/$name.yaml"); done
  grep -q "issuerURL: $ISSUER_PLACEHOLDER\$" examples/local/token-issuer.yaml ||
    die "examples/local/token-issuer.yaml has no issuerURL: $ISSUER_PLACEHOLDER to replace"
  if [[ ! -e $STATE/namespace-created ]]; then
    if [[ -n $(k get namespace "$NAMESPACE" -o name --ignore-not-found) ]]; then
      record namespace-created no
    else
      record namespace-created yes
    fi
  fi
  record applied yes
  sed "s|$ISSUER_PLACEHOLDER|$ISSUER|" "${files[@]}" | k apply -f -
}

wait_for_token() {
  step "waiting for audiencetoken/$TOKEN to be Ready"
  if ! k -n "$NAMESPACE" wait --for=condition=Ready "audiencetoken/$TOKEN" --timeout="${WAIT}s"; then
    k -n "$NAMESPACE" describe audiencetoken "$TOKEN" >&2 || true
    tail -n 20 "$STATE/operator.log" >&2 || true
    die "the token is not Ready after ${WAIT} s (operator log: $STATE/operator.log)"
  fi
}

# jq: a JWT's payload (its second base64url segment) as JSON; an error if not a JWT.
JQ_JWT_PAYLOAD='def jwt_payload: split(".")
  | if length == 3 then .[1] else error("not a JWT") end
  | gsub("-"; "+") | gsub("_"; "/")
  | (if length % 4 == 0 then . else . + ("=" * (4 - length % 4)) end)
  | @base64d | fromjson;'

show_token() {
  step "the token (Secret $NAMESPACE/$TOKEN; the token itself is not shown)"
  local secret
  secret=$(k -n "$NAMESPACE" get secret "$TOKEN" -o json)
  jq -r '.data | map_values(@base64d)
    | "  Secret audience:   \(.audience)",
      "  Secret scope:      \(.scope)",
      "  Secret expires-at: \(.["expires-at"])",
      "  Secret token-type: \(.["token-type"])"' <<<"$secret"
  jq -r "$JQ_JWT_PAYLOAD"'
    .data.token | @base64d | try (jwt_payload
      | "  JWT aud:           \(.aud | if type == "array" then join(", ") else . end)",
        "  JWT scope:         \(.scope // "(none)")",
        "  JWT exp:           \(if .exp then "\(.exp) (\(.exp | todate))" else "(none)" end)",
        "  JWT iss:           \(.iss)",
        "  JWT sub:           \(.sub)")
    catch "  (the token is not a JWT: nothing to decode)"' <<<"$secret"
}

show_pod() {
  step "the pod's view (deployment/$DEPLOYMENT mounts the Secret at $MOUNT)"
  if ! k -n "$NAMESPACE" rollout status "deployment/$DEPLOYMENT" --timeout="${WAIT}s"; then
    k -n "$NAMESPACE" get pods -l "app=$DEPLOYMENT" >&2 || true
    die "deployment/$DEPLOYMENT is not available after ${WAIT} s"
  fi
  say "kubectl -n $NAMESPACE exec deploy/$DEPLOYMENT -- (the files in $MOUNT):"
  # shellcheck disable=SC2016 # expanded by the pod's shell
  k -n "$NAMESPACE" exec "deploy/$DEPLOYMENT" -- sh -c '
    cd "$1" && echo "  files: $(ls | tr "\n" " ")"
    for f in audience scope expires-at token-type; do echo "  $f: $(cat "$f")"; done
    echo "  token: $(wc -c < token) bytes"' sh "$MOUNT"
  say "kubectl -n $NAMESPACE logs deploy/$DEPLOYMENT (a line every 30 s):"
  k -n "$NAMESPACE" logs "deploy/$DEPLOYMENT" --tail=3 | sed 's/^/  /'
}

next_steps() {
  cat <<EOF

==> It works. To try next:
  kubectl --context $CONTEXT -n $NAMESPACE get audtoken
  kubectl --context $CONTEXT -n $NAMESPACE describe audtoken $TOKEN
  kubectl --context $CONTEXT -n $NAMESPACE logs -f deploy/$DEPLOYMENT
  # force a renewal; the pod's files follow within about a minute
  kubectl --context $CONTEXT -n $NAMESPACE annotate audtoken $TOKEN --overwrite \\
    audiencetoken.io/renew-requested-at=\$(date -u +%FT%TZ)
  curl -s http://$OPERATOR_ADDR/metrics | grep '^audience_token'
  tail -f $STATE/operator.log
Remove everything this made: scripts/quickstart.sh down
EOF
}

# On an up that stops early: nothing recorded leaves nothing behind; else say how to clean up.
up_failed() {
  local status=$?
  ((status != 0)) || return 0
  rmdir "$STATE" 2>/dev/null || true
  [[ ! -d $STATE ]] ||
    printf '\nquickstart: up did not finish. What it made is recorded in %s: scripts/quickstart.sh down removes it.\n' \
      "$STATE" >&2
}

up() {
  need kubectl "to talk to the cluster"
  need jq "to read the server's address and decode the token"
  need curl "to wait for the server and the operator"
  need node "for the test authorization server (Node.js >= 20.19)"
  need npm "to install the test authorization server's packages"
  node -e 'const [a, b] = process.versions.node.split(".").map(Number);
    process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' ||
    die "the test authorization server needs Node.js >= 20.19, this is $(node --version)"
  [[ -n ${ATO_BIN:-} ]] || need cargo "to build the operator (or set ATO_BIN to a built one)"

  mkdir -p "$STATE"
  trap up_failed EXIT

  step "the cluster"
  choose_cluster
  install_crds
  start_oidc_server
  start_operator
  apply_examples
  wait_for_token
  show_token
  show_pod
  next_steps
}

# Deletes, in reverse order, what apply_examples applied (the namespace only if up made it).
delete_examples() {
  local name i args=()
  for ((i = ${#EXAMPLES[@]} - 1; i >= 0; i--)); do
    name=${EXAMPLES[i]}
    [[ $name == namespace && $(recorded namespace-created || true) != yes ]] ||
      args+=(-f "examples/local/$name.yaml")
  done
  say "deleting what up applied (context $CONTEXT)"
  k delete --ignore-not-found --timeout=120s "${args[@]}"
}

down() {
  if [[ ! -d $STATE ]]; then
    say "nothing to remove: no $STATE (no quickstart is up)"
    return 0
  fi
  local context tool
  stop_process operator
  stop_process oidc-server
  context=$(recorded context || true)
  tool=$(recorded cluster || true)
  if [[ -n $tool ]]; then
    # Everything else went into that cluster.
    [[ $tool == kind || $tool == k3d ]] || die "$STATE/cluster names an unknown tool: $tool"
    if ! command -v "$tool" >/dev/null 2>&1; then
      die "up created a $tool cluster named $CLUSTER_NAME, and $tool is not installed any more"
    elif cluster_exists "$tool"; then
      say "deleting the $tool cluster $CLUSTER_NAME, which up created"
      case $tool in
        kind) kind delete cluster --name "$CLUSTER_NAME" ;;
        k3d) k3d cluster delete "$CLUSTER_NAME" ;;
      esac
    else
      # Its creation failed, or it is gone already.
      say "$tool lists no cluster named $CLUSTER_NAME: nothing to delete"
    fi
  elif [[ -n $context && (-e $STATE/applied || -s $STATE/crds-created) ]]; then
    reachable "$context" ||
      die "context $context does not reach its cluster, so what up made there is still there;" \
        "$STATE keeps the record: run scripts/quickstart.sh down again once it answers"
    CONTEXT=$context
    if [[ -e $STATE/applied ]]; then
      delete_examples
      rm -f "$STATE/applied"
    fi
    if [[ -s $STATE/crds-created ]]; then
      say "deleting the CRDs up installed"
      # shellcheck disable=SC2046 # one name a line, no spaces
      k delete --ignore-not-found --timeout=120s $(cat "$STATE/crds-created")
    fi
  fi
  rm -rf "$STATE"
  say "removed everything quickstart made"
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
