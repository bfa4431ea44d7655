#!/usr/bin/env python3
"""Checks the Helm chart helm/fsp, with Helm's own Go SDK (helm-python-sdk) and the
Kubernetes API schemas (kubernetes-validate); no helm binary, no cluster.

For each scenario (the defaults, replicaCount=3, each example values file, literal
secrets): `helm lint --strict` against Kubernetes 1.31, `helm template`, every manifest
validated against the 1.31 schemas in strict mode (unknown fields are errors), then the
chart's own promises: a PodDisruptionBudget only with more than one replica, certificate
Secrets mounted whole (no subPath) and left out of the pod template's checksums, no URL
in the ConfigMap, every file the gateway's configuration names mounted. Values the schema
or the templates must refuse are tried too.

With FSP_BIN naming an `fsp` binary, each scenario's rendered configuration is also
given to `fsp check`, with throwaway certificates made by openssl at the mounted paths.

Exit status 0 when all passed; 1 with every problem listed.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fsp"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "fsp", "fsp"
SECRETS_DIR = "/var/run/secrets/fsp"
STATE_DIR = "/var/lib/fsp"
CONFIG_DIR = "/etc/fsp"

problems: list[str] = []


def problem(scenario: str, message: str) -> None:
    problems.append(f"[{scenario}] {message}")
    print(f"  FAIL {message}")


def example(name: str) -> dict:
    return helm.values_from_yaml((CHART / "examples" / name).read_text())


# Values given literally where Secrets are usual: they must end up in the chart's Secret.
LITERAL = {
    "replicaCount": 2,
    "admin": {"tls": True, "adminCns": ["ops.example.be"], "adminCa": {"existingSecret": "fsp-admin-ca"},
              "tokens": {"values": ["ops:literal-admin-token-123"]}},
    "audit": {"backend": "postgres", "postgres": {
        "url": "postgres://fsp:literal-pg-password@pg:5432/fsp?sslmode=verify-full"
               f"&sslrootcert={SECRETS_DIR}/audit-postgres-tls/ca.crt"
               f"&sslcert={SECRETS_DIR}/audit-postgres-tls/tls.crt&sslkey={SECRETS_DIR}/audit-postgres-tls/tls.key",
        "tls": {"existingSecret": "fsp-postgres-client", "clientCertificate": True}}},
    "throttle": {"backend": "redis", "redis": {"url": "rediss://:literal-redis-password@redis:6380/0",
                                               "tls": {"existingSecret": "fsp-redis-tls", "clientCertificate": True}}},
    "cluster": {"enabled": True, "redis": {"url": "rediss://:literal-redis-password@redis:6380/1",
                                           "tls": {"existingSecret": "fsp-redis-client",
                                                   "caCertificate": False, "clientCertificate": True}}},
    "telemetry": {"enabled": True},
    "listener": {"proxyProtocolFrom": ["10.0.0.0/24"], "clientCa": {"existingSecret": "fsp-consumers-ca", "crlKeys": ["ca.crl"]}},
    "networkPolicy": {"egress": {
        "redis": {"peers": [{"podSelector": {"matchLabels": {"app": "redis"}}}]},
        "postgres": {"cidrs": ["10.1.2.0/24"]},
        "otlp": {"peers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]},
    }},
}
LITERAL_SECRETS = ["literal-admin-token-123", "literal-pg-password", "literal-redis-password"]

# name, values, whether a PodDisruptionBudget is expected, whether an HPA is expected
SCENARIOS = [
    ("defaults (replicaCount=1)", {}, False, False),
    ("replicaCount=1", {"replicaCount": 1}, False, False),
    ("replicaCount=3", {"replicaCount": 3}, True, False),
    ("examples/values-int.yaml", example("values-int.yaml"), True, False),
    ("examples/values-prod.yaml", example("values-prod.yaml"), True, True),
    ("literal URLs and tokens", LITERAL, True, False),
]

# Values that must be refused (by the schema or by the templates), and a word of the error.
REFUSED = [
    ("unknown top-level key", {"replicas": 2}, "additional properties"),
    ("unknown nested key", {"listener": {"publicURL": "https://x"}}, "additional properties"),
    ("environment not INT/PROD", {"environment": "DEV"}, "environment"),
    ("sampling ratio above 1", {"telemetry": {"samplingRatio": 2}}, "samplingRatio"),
    ("postgres audit without a URL", {"audit": {"backend": "postgres"}}, "audit.postgres.url"),
    ("redis throttle without an egress rule",
     {"throttle": {"backend": "redis", "redis": {"url": "redis://r:6379"}}}, "networkPolicy.egress.redis"),
    ("a map in listener.settings", {"listener": {"settings": {"x": {"y": 1}}}}, "settings"),
    ("no admin tokens", {"admin": {"tokens": {"existingSecret": ""}}}, "admin.tokens"),
    ("an admin CA without admin CNs", {"admin": {"adminCa": {"existingSecret": "fsp-admin-ca"}}}, "admin.adminCa"),
    ("a PostgreSQL URL naming a certificate file not mounted",
     {"audit": {"backend": "postgres", "postgres": {
         "url": f"postgres://fsp@pg/fsp?sslmode=verify-full&sslrootcert={SECRETS_DIR}/audit-postgres-tls/ca.crt"}}},
     "audit.postgres.tls does not mount"),
    ("PostgreSQL certificate files mounted that the URL does not name",
     {"audit": {"backend": "postgres", "postgres": {
         "url": "postgres://fsp@pg/fsp", "tls": {"existingSecret": "fsp-postgres-client"}}}},
     "audit.postgres.url does not name it"),
    ("a short admin token", {"admin": {"tokens": {"existingSecret": "", "values": ["ops:short"]}}}, "admin/tokens/values"),
]


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def lint(scenario: str, values: dict) -> None:
    report = helm.lint(CHART, values or None, strict=True, kube_version=f"v{KUBE_VERSION}")
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in bad:
        level = {2: "warning", 3: "error"}.get(m["severity"], "?")
        problem(scenario, f"helm lint --strict: {level} in {m['path']}: {m['error'].strip()}")
    for e in report.get("errors") or []:
        if not any(e.strip() == m["error"].strip() for m in bad):
            problem(scenario, f"helm lint --strict: {e.strip()}")
    if not bad and not report.get("errors"):
        print("  ok   helm lint --strict")


def render(values: dict) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict]]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


def validate(scenario: str, docs: list[tuple[str, dict]]) -> None:
    ok = True
    for path, doc in docs:
        what = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            ok = False
            where = ".".join(str(p) for p in e.path)
            problem(scenario, f"{what} is not a valid Kubernetes {KUBE_VERSION} object: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            ok = False
            problem(scenario, f"{what}: {e.message}")
    if ok:
        print(f"  ok   {len(docs)} manifests valid against Kubernetes {KUBE_VERSION} (strict)")


def only(docs, kind):
    return [d for _, d in docs if d.get("kind") == kind]


def assert_chart(scenario: str, docs, values: dict, want_pdb: bool,
                 want_hpa: bool) -> tuple[dict[str, str], dict[str, str]] | None:
    """The chart's own promises. Returns the ConfigMap's files and the chart's Secret."""
    before = len(problems)
    pdbs, hpas = only(docs, "PodDisruptionBudget"), only(docs, "HorizontalPodAutoscaler")
    if want_pdb and len(pdbs) != 1:
        problem(scenario, f"expected one PodDisruptionBudget, found {len(pdbs)}")
    if not want_pdb and pdbs:
        problem(scenario, "a PodDisruptionBudget was rendered for a single replica (it would block node drains)")
    if want_hpa != bool(hpas):
        problem(scenario, f"expected {'an' if want_hpa else 'no'} HorizontalPodAutoscaler, found {len(hpas)}")

    deployments = only(docs, "Deployment")
    if len(deployments) != 1:
        problem(scenario, f"expected one Deployment, found {len(deployments)}")
        return None
    dep = deployments[0]
    if want_hpa and "replicas" in dep["spec"]:
        problem(scenario, "the Deployment sets replicas although the HPA owns them")
    if not want_hpa and dep["spec"].get("replicas") != values.get("replicaCount", 1):
        problem(scenario, f"Deployment replicas {dep['spec'].get('replicas')} != replicaCount")
    pod = dep["spec"]["template"]
    spec = pod["spec"]
    annotations = pod["metadata"].get("annotations", {})
    if "checksum/config" not in annotations:
        problem(scenario, "the pod template has no checksum/config annotation (config changes would not roll pods)")
    for k in annotations:
        if k.startswith("checksum/") and k not in ("checksum/config", "checksum/secret"):
            problem(scenario, f"unexpected checksum annotation {k}: certificate Secrets are hot-reloaded, not summed")
    psc = spec.get("securityContext", {})
    for k, v in {"runAsNonRoot": True, "runAsUser": 65532}.items():
        if psc.get(k) != v:
            problem(scenario, f"podSecurityContext.{k} is {psc.get(k)!r}, expected {v!r}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem(scenario, "podSecurityContext.seccompProfile is not RuntimeDefault")
    if "fsGroup" not in psc:
        problem(scenario, "podSecurityContext.fsGroup is unset (the 0440 Secret files would be unreadable)")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    listener = values["listener"]
    if grace <= listener["drainTimeoutSeconds"] + listener["shutdownDelaySeconds"]:
        problem(scenario, f"terminationGracePeriodSeconds {grace} does not exceed shutdown delay + drain timeout")
    if not values.get("affinity") and not spec.get("affinity", {}).get("podAntiAffinity"):
        problem(scenario, "no default pod anti-affinity")

    (container,) = [c for c in spec["containers"] if c["name"] == "fsp"]
    sc = container.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False \
            or sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(scenario, f"container securityContext is not read-only/no-escalation/drop ALL: {sc}")
    probes = {p: container.get(p, {}).get("httpGet", {}) for p in ("readinessProbe", "livenessProbe")}
    if probes["readinessProbe"].get("path") != "/readyz" or probes["readinessProbe"].get("port") != "admin":
        problem(scenario, f"readiness probe is not GET /readyz on the admin port: {probes['readinessProbe']}")
    if probes["livenessProbe"].get("path") != "/healthz" or probes["livenessProbe"].get("port") != "admin":
        problem(scenario, f"liveness probe is not GET /healthz on the admin port: {probes['livenessProbe']}")
    env = {e["name"]: e for e in container.get("env", [])}
    if env.get("FSP_NODE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problem(scenario, "FSP_NODE is not the pod's name (replicas need distinct audit node names)")

    mounts = container.get("volumeMounts", [])
    for m in mounts:
        if m.get("subPath") or m.get("subPathExpr"):
            problem(scenario, f"volume {m['name']} is mounted with subPath: Secret and ConfigMap updates would not reach the pod")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    by_path = {m["mountPath"]: volumes.get(m["name"]) for m in mounts}

    configmaps = only(docs, "ConfigMap")
    if len(configmaps) != 1:
        problem(scenario, f"expected one ConfigMap, found {len(configmaps)}")
        return None
    files = configmaps[0]["data"]
    text = "\n".join(files.values())
    if re.search(r"(postgres(ql)?|rediss?)://", text):
        problem(scenario, "the ConfigMap holds a backend URL: URLs carry passwords and belong in Secrets")
    chart_secret = {}
    for s in only(docs, "Secret"):
        chart_secret = {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
    if values.get("audit", {}).get("postgres", {}).get("url") == LITERAL["audit"]["postgres"]["url"]:
        for secret in LITERAL_SECRETS:
            if not any(secret in v for v in chart_secret.values()):
                problem(scenario, f"the literal secret {secret} is not in the chart's Secret")
    for secret in LITERAL_SECRETS:
        if secret in text or any(secret in str(d) for _, d in docs if d.get("kind") not in ("Secret",)):
            problem(scenario, f"a literal secret ({secret}) appears outside the chart's Secret")

    # Every file the configuration names is in a mounted volume (and, for the chart's
    # own Secret, is one of its keys).
    try:
        main = tomllib.loads(files["fsp.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        problem(scenario, f"fsp.toml does not parse as TOML: {e}")
        return None
    for name in main.get("include", []):
        if name not in files:
            problem(scenario, f"fsp.toml includes {name}, which the ConfigMap lacks")
        else:
            try:
                tomllib.loads(files[name])
            except tomllib.TOMLDecodeError as e:
                problem(scenario, f"{name} does not parse as TOML: {e}")
    for key, path in [*config_paths(files), *url_paths(chart_secret)]:
        mount = next((mp for mp in by_path if path.startswith(mp.rstrip("/") + "/")), None)
        if mount is None:
            problem(scenario, f"{key} = {path} is in no mounted volume")
            continue
        vol = by_path[mount] or {}
        rel = path[len(mount.rstrip("/")) + 1:]
        secret = vol.get("secret")
        if secret and secret.get("items"):
            items = {i["path"]: i["key"] for i in secret["items"]}
            if rel not in items:
                problem(scenario, f"{key} = {path}: the volume {vol['name']} has no item {rel}")
            elif secret["secretName"] == f"{RELEASE}" and items[rel] not in chart_secret:
                problem(scenario, f"{key} = {path}: the chart's Secret has no key {items[rel]}")
    if len(problems) == before:
        print("  ok   chart assertions (PDB, HPA, probes, security, mounts, no URL in the ConfigMap)")
    return files, chart_secret


def url_paths(secret: dict[str, str]):
    """(key, absolute path) of every file a backend URL in the chart's Secret names
    (libpq's sslrootcert, sslcert, sslkey)."""
    for name, value in secret.items():
        for param, path in re.findall(r"[?&]([a-z]+)=(/[^&\s]*)", value):
            yield f"secret {name}: {param}", path


PATH_KEYS = re.compile(r"(_cert|_key|_ca|_file|^crls|^ca|^cert|^key)$")


def config_paths(files: dict[str, str]):
    """(key path, absolute path) of every file the configuration names."""
    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and node.startswith("/") and PATH_KEYS.search(key.split(".")[-1].split("[")[0]):
            yield key, node
    for name, text in files.items():
        try:
            for key, path in walk(tomllib.loads(text), ""):
                yield f"{name}: {key}", path
        except tomllib.TOMLDecodeError:
            pass


# ---- fsp check ---------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def throwaway_pki(d: Path) -> None:
    """A CA, a leaf signed by it (for every certificate/key pair) and an empty CRL."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=fsp-ci-ca", cwd=d)
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=fsp-ci", cwd=d)
    (d / "ext").write_text("subjectAltName=DNS:fsp-ci\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "leaf.crt", "-extfile", "ext", cwd=d)
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = ci\n[ci]\ndatabase = index.txt\ncrlnumber = crlnumber\n"
        "default_md = sha256\ndefault_crl_days = 2\n")
    openssl("ca", "-gencrl", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.crt", "-out", "ca.crl", cwd=d)
    openssl("genpkey", "-algorithm", "ed25519", "-out", "audit-signing.pem", cwd=d)
    # The chain: leaf first.
    (d / "chain.crt").write_text((d / "leaf.crt").read_text() + (d / "ca.crt").read_text())


def fake_content(key: str, pki: Path) -> str:
    """What a file named by `key` ("fsp.toml: audit.url_file") holds, for `fsp check`."""
    key = key.split(": ", 1)[-1]
    last = key.split(".")[-1]
    if last.startswith("crls"):
        return (pki / "ca.crl").read_text()
    if last in ("client_ca", "upstream_ca", "admin_ca", "ca"):
        return (pki / "ca.crt").read_text()
    if last == "signing_key":
        return (pki / "audit-signing.pem").read_text()
    if last.endswith("_key") or last == "key":
        return (pki / "leaf.key").read_text()
    if last.endswith("_cert") or last == "cert":
        return (pki / "chain.crt").read_text()
    if last == "tokens_file":
        return "ci:fsp-ci-token-0123456789\n"
    if key.startswith("audit."):
        return "postgres://fsp:ci@127.0.0.1:5432/fsp\n"
    if last in ("url_file", "redis_url_file"):
        return "redis://127.0.0.1:6379\n"  # rediss:// where the section sets TLS: see fsp_check
    return ""


def fsp_check(scenario: str, fsp: str, files: dict[str, str], chart_secret: dict[str, str], pki: Path) -> bool:
    with tempfile.TemporaryDirectory(prefix="fsp-helm-check-") as tmp:
        t = Path(tmp)
        conf, secrets, state = t / "etc-fsp", t / "secrets", t / "state"
        for d in (conf, secrets, state):
            d.mkdir()
        for key, path in config_paths(files):
            if path.startswith(SECRETS_DIR + "/"):
                f = secrets / path[len(SECRETS_DIR) + 1:]
                f.parent.mkdir(parents=True, exist_ok=True)
                content = fake_content(key, pki)
                section = key.split(": ", 1)[-1].split(".")[0]
                if content.startswith("redis://") and any(
                        f"[{section}]" in text and ("\ntls = " in text or "\nredis_tls = " in text)
                        for text in files.values()):
                    content = "rediss://fsp-ci:6380\n"
                if content.startswith("postgres://") and "audit-url" in chart_secret:
                    # The chart's own URL, its certificate files made as any other.
                    content = chart_secret["audit-url"].replace(SECRETS_DIR + "/", f"{secrets}/")
                    for param, path in url_paths({"audit-url": chart_secret["audit-url"]}):
                        g = secrets / path[len(SECRETS_DIR) + 1:]
                        g.parent.mkdir(parents=True, exist_ok=True)
                        g.write_text(fake_content({"sslrootcert": "ca", "sslcert": "cert", "sslkey": "key"}
                                                  .get(param.split(": ")[-1], ""), pki))
                f.write_text(content)
        for name, text in files.items():
            text = text.replace(SECRETS_DIR + "/", f"{secrets}/").replace(STATE_DIR + "/", f"{state}/")
            (conf / name).write_text(text)
        env = dict(os.environ, FSP_NODE="fsp-ci-0")
        r = subprocess.run([fsp, "check", "--config", str(conf / "fsp.toml")], capture_output=True, text=True,
                           env=env, timeout=60)
        out = (r.stdout + r.stderr).strip().replace(str(conf) + "/", f"{CONFIG_DIR}/") \
            .replace(str(secrets) + "/", f"{SECRETS_DIR}/").replace(str(state) + "/", f"{STATE_DIR}/")
        print("\n".join("         | " + line for line in out.splitlines()))
        if r.returncode != 0:
            problem(scenario, f"fsp check refused the rendered configuration (exit {r.returncode}); its output is above")
            return False
        print("  ok   fsp check accepted the rendered configuration")
        return True


# ---- main --------------------------------------------------------------------------

def main() -> int:
    print(f"helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, Kubernetes {KUBE_VERSION}")
    fsp = os.environ.get("FSP_BIN", "")
    if fsp and not (os.path.isfile(fsp) and os.access(fsp, os.X_OK)):
        problem("FSP_BIN", f"FSP_BIN={fsp} is not an executable file")
        fsp = ""
    pki_dir = tempfile.TemporaryDirectory(prefix="fsp-helm-pki-") if fsp else None
    if pki_dir:
        if not shutil.which("openssl"):
            problem("FSP_BIN", "openssl is needed to make the throwaway certificates")
            fsp = ""
        else:
            throwaway_pki(Path(pki_dir.name))

    with helm.Chart.load(CHART) as chart:
        defaults = chart.values
    for name, values, want_pdb, want_hpa in SCENARIOS:
        print(f"== {name}")
        lint(name, values)
        try:
            rendered = render(values)
        except helm.HelmError as e:
            problem(name, f"helm template failed: {e}")
            continue
        docs = manifests(rendered)
        validate(name, docs)
        checked = assert_chart(name, docs, merge(defaults, values), want_pdb, want_hpa)
        if fsp and checked:
            fsp_check(name, fsp, *checked, Path(pki_dir.name))

    print("== values the chart must refuse")
    for name, values, word in REFUSED:
        try:
            render(values)
            problem(name, "rendered, but should have been refused")
        except helm.HelmError as e:
            if word not in str(e):
                problem(name, f"refused, but the message does not name {word!r}: {e}")
            else:
                print(f"  ok   {name}: {str(e).strip().splitlines()[-1].strip()}")

    if not fsp:
        print("== fsp check: skipped (set FSP_BIN to an fsp binary to run it)")
    print()
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("helm chart checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
