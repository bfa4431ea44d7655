#!/usr/bin/env bash
# Benchmark one mTLS REST workload three ways and compare:
#   direct : oha --mTLS--> upstream nginx (HTTPS, client certificate required)
#   nginx  : oha --mTLS--> nginx reverse proxy --HTTP keep-alive--> upstream
#   fsp    : oha --mTLS--> fsp gateway         --HTTP keep-alive--> upstream
#
# Everything runs on loopback, in one temporary directory, with certificates made
# at run time. See load-tests/README.md for the knobs (env vars) and the output.
#
# Exit status: 0 when all targets ran and every response was 200 (PASS or MISS
# against the targets does not change it); 1 when something failed to start or
# run; 3 when a benchmark ran but saw errors or non-200 responses.

set -Eeuo pipefail

# ---------------------------------------------------------------- settings --
CONCURRENCY=${CONCURRENCY:-32}
DURATION=${DURATION:-10}              # seconds, per measured run
WARMUP=${WARMUP:-2}                   # seconds, before each measured run
ROUNDS=${ROUNDS:-3}                   # repeat the set; medians are reported
# (Three interleaved rounds by default: on a small VM the machine itself drifts by
# 10 % or more within a minute, and one round per target compares two moments.)
SKIP_FSP=${SKIP_FSP:-0}
# INSTRUCTIONS=1: instead of the throughput run, count fsp's instructions per call with
# callgrind (repeatable where timings are not): WARMUP_CALLS calls, counters zeroed, then
# CALLS calls at concurrency 8, and the total divided by CALLS (TLS handshakes of oha's
# 8 connections included, about 2 k per call at 10 000 calls).
INSTRUCTIONS=${INSTRUCTIONS:-0}
CALLS=${CALLS:-10000}
WARMUP_CALLS=${WARMUP_CALLS:-1000}
KEEP_TMP=${KEEP_TMP:-0}
UPSTREAM_HTTP_PORT=${UPSTREAM_HTTP_PORT:-18080}
UPSTREAM_TLS_PORT=${UPSTREAM_TLS_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
FSP_PORT=${FSP_PORT:-18443}
# THROTTLE=local|redis adds the target fsp-throttled: a second fsp with throttling on
# (limits far above the load, so every call is admitted and only the cost is measured).
THROTTLE=${THROTTLE:-}
FSPT_PORT=${FSPT_PORT:-18444}
FSPT_ADMIN_PORT=${FSPT_ADMIN_PORT:-19444}
THROTTLE_REDIS_URL=${THROTTLE_REDIS_URL:-${FSP_TEST_REDIS_URL:-redis://127.0.0.1:6379}}
# AUDIT=off|postgres measures the audit trail instead: the target fsp-throttled is then a
# second fsp with no trail ([audit] backend = "none", fail_closed = false), and fsp
# keeps its trail in files (off) or in PostgreSQL (postgres, at AUDIT_POSTGRES_URL, in a
# schema of its own made for the run), write-ahead (fail_closed = true) either way.
AUDIT=${AUDIT:-}
AUDIT_POSTGRES_URL=${AUDIT_POSTGRES_URL:-${FSP_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}}
FSP_ADMIN_PORT=${FSP_ADMIN_PORT:-19443}
# TELEMETRY=RATIO measures OpenTelemetry instead: the target fsp-throttled is then a
# second fsp with [telemetry] at sampling_ratio = RATIO (e.g. 0.01), exporting OTLP/HTTP
# to a local collector (a Python sink on OTLP_PORT that accepts and discards), and fsp
# runs without it; both run without an audit trail; the ratio on/off is reported.
TELEMETRY=${TELEMETRY:-}
OTLP_PORT=${OTLP_PORT:-14318}
# SOAP=1 measures SOAP calls instead (see README): on the one fsp, POSTs of a 1 KiB SOAP
# envelope answered by a 1 KiB envelope, with the XML checks on (fsp-soap) and off
# (fsp-soap-off, xml_checks = false), and POSTs of 1 KiB JSON to the REST service
# (fsp-rest), side by side.
SOAP=${SOAP:-0}
export FSP_LOG=${FSP_LOG:-warn}       # nginx runs with access_log off; keep fsp's log quiet too
# Thresholds (fsp against nginx).
MIN_RPS_RATIO=${MIN_RPS_RATIO:-0.9}
MAX_P99_RATIO=${MAX_P99_RATIO:-1.5}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
cd "$REPO_ROOT"
FSP_BIN=${FSP_BIN:-target/release/fsp}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}

export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

log()  { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die()  { log "ERROR: $*"; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for v in CONCURRENCY DURATION WARMUP ROUNDS UPSTREAM_HTTP_PORT UPSTREAM_TLS_PORT NGINX_PORT FSP_PORT FSP_ADMIN_PORT; do
    is_uint "${!v}" || die "$v must be a non-negative integer (got '${!v}')"
done
(( CONCURRENCY >= 1 && DURATION >= 1 && ROUNDS >= 1 )) || die "CONCURRENCY, DURATION and ROUNDS must be >= 1"

# ---------------------------------------------------------------- cleanup --
TMP=""
PIDS=()        # background processes we started (nginx masters, fsp)
CHILD=""       # the foreground job (oha) while it runs, so a signal can stop it at once

run_child() {  # run_child CMD...: run CMD as a job and wait for it, so INT/TERM traps fire at once
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# shellcheck disable=SC2317  # invoked from the EXIT trap
stop_pid() {   # stop_pid PID: TERM, wait up to 10 s, then KILL it and its children
    local pid=$1 i children
    kill -0 "$pid" 2>/dev/null || return 0
    children=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid did not stop on TERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for c in $children; do
        if kill -0 "$c" 2>/dev/null; then kill -KILL "$c" 2>/dev/null || true; fi
    done
    wait "$pid" 2>/dev/null || true
}

CLEANED=0
# shellcheck disable=SC2317  # invoked from the EXIT trap
cleanup() {
    (( CLEANED )) && return 0
    CLEANED=1
    local pid
    [[ -n $CHILD ]] && stop_pid "$CHILD"
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    if [[ -n ${AUDIT_SCHEMA:-} && $KEEP_TMP != 1 ]]; then
        psql "$AUDIT_POSTGRES_URL" -qc "DROP SCHEMA $AUDIT_SCHEMA CASCADE" >/dev/null 2>&1 || true
    fi
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then
            log "kept temporary directory $TMP"
        else
            rm -rf -- "$TMP"
        fi
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- tools --
command -v oha >/dev/null 2>&1 || { log "installing oha"; cargo install oha --locked; }
command -v nginx >/dev/null 2>&1 || { log "installing nginx-light"; apt-get update && apt-get install -y nginx-light; }
for t in oha nginx openssl python3 curl; do
    command -v "$t" >/dev/null 2>&1 || die "$t is required but not found"
done

if [[ $SKIP_FSP != 1 ]]; then
    if [[ ! -x $FSP_BIN ]]; then
        log "$FSP_BIN not found: cargo build --release -p proxy"
        cargo build --release -p proxy
        [[ -x $FSP_BIN ]] || die "$FSP_BIN still missing after the build (set FSP_BIN?)"
    fi
    FSP_BIN=$(cd "$(dirname "$FSP_BIN")" && pwd)/$(basename "$FSP_BIN")
fi

# One run at a time on this machine: a second one would share the CPUs and the ports.
LOCK=${TMPDIR:-/tmp}/fsp-loadtest.lock
exec 9>>"$LOCK"
flock -n 9 || die "another load-tests/run.sh is running (lock $LOCK); wait for it to finish"

port_free() {  # exits non-zero if 127.0.0.1:PORT cannot be bound (TIME_WAIT is fine, like nginx)
    python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}
ports=(UPSTREAM_HTTP_PORT UPSTREAM_TLS_PORT NGINX_PORT)
[[ $SKIP_FSP == 1 ]] || ports+=(FSP_PORT FSP_ADMIN_PORT)
[[ -z $THROTTLE$AUDIT$TELEMETRY ]] || ports+=(FSPT_PORT FSPT_ADMIN_PORT)
[[ -z $TELEMETRY ]] || ports+=(OTLP_PORT)
for v in "${ports[@]}"; do
    port_free "${!v}" || die "port 127.0.0.1:${!v} is in use; set $v to another port"
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fsp-loadtest.XXXXXX")
# nginx workers may run as an unprivileged user: let them traverse (not list) $TMP.
chmod 0711 "$TMP"
PKI=$TMP/pki
mkdir -m 0700 "$PKI"

# ---------------------------------------------------------------- PKI --
log "making a throw-away PKI in $PKI"
cat >"$PKI/x509.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt             = no
[dn]
CN = unused
[v3_ca]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectAltName         = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid, issuer
EOF
(
    cd "$PKI"
    genkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    genkey ca.key
    openssl req -new -x509 -config x509.cnf -extensions v3_ca -key ca.key -sha256 -days 2 \
        -subj "/CN=fsp load-test CA" -set_serial "0x$(openssl rand -hex 16)" -out ca.pem
    for leaf in server client; do
        genkey "$leaf.key"
        cn=localhost; [[ $leaf == client ]] && cn=loadtest.example.be
        openssl req -new -config x509.cnf -key "$leaf.key" -subj "/CN=$cn" -out "$leaf.csr"
        openssl x509 -req -in "$leaf.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
            -days 2 -sha256 -extfile x509.cnf -extensions "$leaf" -out "$leaf.pem" 2>/dev/null
        openssl verify -CAfile ca.pem -purpose "ssl$leaf" "$leaf.pem" >/dev/null
    done
    chmod 0600 ./*.key
) || die "certificate generation failed"

# ---------------------------------------------------------------- body --
# A fixed JSON document of exactly 1024 bytes (no ', $, \ so nginx can return it verbatim).
BODY=$(python3 - <<'EOF'
import json
doc = {"service": "bench/echo", "version": "v1", "status": "ok",
       "items": [{"id": i, "name": f"item-{i}", "active": i % 2 == 0} for i in range(12)],
       "padding": ""}
base = len(json.dumps(doc, separators=(",", ":")))
doc["padding"] = "x" * (1024 - base)
s = json.dumps(doc, separators=(",", ":"))
assert len(s) == 1024 and not set("'$\\") & set(s)
print(s)
EOF
)

# SOAP=1: the provider's 1 KiB envelope (many small elements, as a real answer has).
SOAP_RESP=$(python3 - <<'EOF'
items = "".join(f'<b:item id="{i}"><b:name>item-{i}</b:name><b:active>{str(i % 2 == 0).lower()}</b:active></b:item>' for i in range(8))
head = '<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><b:getItemsResponse xmlns:b="urn:bench">'
tail = '</b:getItemsResponse></soap:Body></soap:Envelope>'
pad = 1024 - len(head + items + tail) - len("<b:padding></b:padding>")
s = head + items + "<b:padding>" + "x" * pad + "</b:padding>" + tail
assert len(s) == 1024 and not set("'$\\") & set(s)
print(s)
EOF
)

# ---------------------------------------------------------------- nginx --
nginx_common() {  # nginx_common DIR WORKERS: main + events + start of http block
    cat <<EOF
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_body_temp_path $1/tmp/client_body;
    proxy_temp_path       $1/tmp/proxy;
    fastcgi_temp_path     $1/tmp/fastcgi;
    uwsgi_temp_path       $1/tmp/uwsgi;
    scgi_temp_path        $1/tmp/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
EOF
}
mtls_directives() {
    cat <<EOF
        ssl_certificate        $PKI/server.pem;
        ssl_certificate_key    $PKI/server.key;
        ssl_client_certificate $PKI/ca.pem;
        ssl_verify_client      on;
EOF
}

UP_DIR=$TMP/upstream
PX_DIR=$TMP/nginx-proxy
mkdir -p "$UP_DIR/tmp" "$PX_DIR/tmp"
{
    nginx_common "$UP_DIR" 1
    cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_HTTP_PORT backlog=4096;
        location / {
            default_type application/json;
            return 200 '$BODY';
        }
        location /soap {
            default_type text/xml;
            return 200 '$SOAP_RESP';
        }
    }
    server {
        listen 127.0.0.1:$UPSTREAM_TLS_PORT ssl backlog=4096;
$(mtls_directives)
        location / {
            default_type application/json;
            return 200 '$BODY';
        }
    }
}
EOF
} >"$UP_DIR/nginx.conf"
{
    nginx_common "$PX_DIR" 2
    cat <<EOF
    upstream bench_upstream {
        server 127.0.0.1:$UPSTREAM_HTTP_PORT;
        keepalive 64;
        keepalive_requests 100000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl backlog=4096;
$(mtls_directives)
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$PX_DIR/nginx.conf"

CURL_TLS=(-4 --http1.1 --silent --show-error --max-time 5 --cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key")

READY_TRIES=75
[[ $INSTRUCTIONS == 1 ]] && READY_TRIES=600   # valgrind starts slowly
wait_ready() {  # wait_ready NAME PID URL LOGFILE: until URL answers any HTTP status (max ~15 s)
    local name=$1 pid=$2 url=$3 logf=$4 code i
    for ((i = 0; i < READY_TRIES; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited during start-up; last log lines:"
            tail -n 30 "$logf" >&2 || true
            die "$name did not start"
        fi
        code=$(curl "${CURL_TLS[@]}" --max-time 1 -o /dev/null -w '%{http_code}' "$url" 2>/dev/null || true)
        [[ -n $code && $code != 000 ]] && return 0
        sleep 0.2
    done
    tail -n 30 "$logf" >&2 || true
    die "$name not answering on $url after 15 s"
}

start_nginx() {  # start_nginx NAME DIR
    local name=$1 dir=$2
    nginx -t -q -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" 2>"$dir/config-test.log" || { cat "$dir/config-test.log" >&2; die "$name: invalid nginx configuration"; }
    nginx -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
    PIDS+=("$!")
}

log "starting upstream nginx (HTTP :$UPSTREAM_HTTP_PORT, mTLS :$UPSTREAM_TLS_PORT) and proxy nginx (mTLS :$NGINX_PORT)"
start_nginx upstream "$UP_DIR"
UPSTREAM_PID=${PIDS[-1]}
wait_ready upstream "${PIDS[-1]}" "https://localhost:$UPSTREAM_TLS_PORT/" "$UP_DIR/error.log"
start_nginx nginx-proxy "$PX_DIR"
PROXY_PID=${PIDS[-1]}
wait_ready nginx-proxy "${PIDS[-1]}" "https://localhost:$NGINX_PORT/" "$PX_DIR/error.log"

# ---------------------------------------------------------------- fsp --
FSP_VERSION="skipped"
FSP_PID=""
if [[ $SKIP_FSP != 1 ]]; then
    FSP_DIR=$TMP/fsp
    mkdir -m 0700 "$FSP_DIR" "$FSP_DIR/audit"
    cp "$PKI/server.pem" "$PKI/server.key" "$PKI/ca.pem" "$FSP_DIR/"
    python3 -c 'import secrets; print(secrets.token_hex(24))' >"$FSP_DIR/admin-tokens"
    chmod 0600 "$FSP_DIR/admin-tokens" "$FSP_DIR/server.key"
    AUDIT_SECTION='backend     = "file"
dir         = "audit"'
    case $AUDIT in
        ''|off) ;;
        postgres)
            AUDIT_SCHEMA=fsp_loadtest_$$
            psql "$AUDIT_POSTGRES_URL" -qc "CREATE SCHEMA $AUDIT_SCHEMA" || die "cannot create schema $AUDIT_SCHEMA at $AUDIT_POSTGRES_URL"
            sep='?'; [[ $AUDIT_POSTGRES_URL == *'?'* ]] && sep='&'
            AUDIT_SECTION="backend     = \"postgres\"
url         = \"$AUDIT_POSTGRES_URL${sep}options=-csearch_path%3D$AUDIT_SCHEMA\"
dir         = \"audit\""
            ;;
        *) die "AUDIT must be off or postgres, not $AUDIT" ;;
    esac
    # Telemetry is measured without the audit trail on either side: the trail's
    # durable writes bound these runs and would drown a difference of a few percent.
    FAIL_CLOSED=true
    if [[ -n $TELEMETRY ]]; then AUDIT_SECTION='backend     = "none"'; FAIL_CLOSED=false; fi
    cat >"$FSP_DIR/fsp.toml" <<EOF
environment = "INT"

[listener]
address     = "127.0.0.1:$FSP_PORT"
public_url  = "https://localhost:$FSP_PORT"
server_cert = "server.pem"
server_key  = "server.key"
client_ca   = "ca.pem"

[admin]
address     = "127.0.0.1:$FSP_ADMIN_PORT"
tokens_file = "admin-tokens"

[audit]
$AUDIT_SECTION
fail_closed = $FAIL_CLOSED

[throttle]
backend = "local"

[[provider]]
id    = "bench"
name  = "Benchmark upstream"

[[family]]
id       = "bench"
provider = "bench"

[[family.service]]
id       = "echo"
protocol = "rest"

[[family.service.version]]
version  = "v1"
upstream = "http://127.0.0.1:$UPSTREAM_HTTP_PORT"
released = 2025-01-01

[[consumer]]
id           = "loadtest"
organisation = "Load test"
certificates = [ { cn = "loadtest.example.be" } ]

[[authorisation]]
id          = "bench-auth"
consumer    = "loadtest"
service     = "bench/echo"
purpose     = "benchmark"
legal_basis = { kind = "protocol", reference = "BENCH-1" }
provider_approval = "BENCH-OK"
valid_from  = 2025-01-01
EOF
    if [[ $SOAP == 1 ]]; then
        for svc in soap soapoff; do
            checks=""; [[ $svc == soapoff ]] && checks="xml_checks = false"
            cat >>"$FSP_DIR/fsp.toml" <<EOF

[[family]]
id       = "b$svc"
provider = "bench"

[[family.service]]
id       = "$svc"
protocol = "soap"
$checks

[[family.service.version]]
version  = "v1"
upstream = "http://127.0.0.1:$UPSTREAM_HTTP_PORT/soap"
released = 2025-01-01

[[authorisation]]
id          = "bench-$svc"
consumer    = "loadtest"
service     = "b$svc/$svc"
purpose     = "benchmark"
legal_basis = { kind = "protocol", reference = "BENCH-1" }
provider_approval = "BENCH-OK"
valid_from  = 2025-01-01
EOF
        done
    fi
    FSP_VERSION=$({ "$FSP_BIN" --version 2>/dev/null || true; } | head -n 1)
    FSP_VERSION=${FSP_VERSION:-"fsp (version unknown)"}
    log "starting $FSP_VERSION (mTLS :$FSP_PORT, admin :$FSP_ADMIN_PORT, FSP_LOG=$FSP_LOG)"
    FSP_WRAP=()
    if [[ $INSTRUCTIONS == 1 ]]; then
        command -v valgrind >/dev/null 2>&1 || { log "installing valgrind"; apt-get update && apt-get install -y valgrind; }
        FSP_WRAP=(valgrind --tool=callgrind "--callgrind-out-file=$FSP_DIR/callgrind.out.%p")
    fi
    "${FSP_WRAP[@]}" "$FSP_BIN" serve --config "$FSP_DIR/fsp.toml" >"$FSP_DIR/fsp.log" 2>&1 &
    PIDS+=("$!")
    FSP_PID=$!
    wait_ready fsp "${PIDS[-1]}" "https://localhost:$FSP_PORT/" "$FSP_DIR/fsp.log"
fi

FSPT_PID=""
[[ -z $THROTTLE || -z $AUDIT ]] || die "THROTTLE and AUDIT cannot be measured in one run (they share the second fsp)"
[[ -z $TELEMETRY || ( -z $THROTTLE && -z $AUDIT ) ]] || die "TELEMETRY cannot be measured with THROTTLE or AUDIT (they share the second fsp)"
if [[ -n $TELEMETRY && $SKIP_FSP != 1 ]]; then
    python3 - "$OTLP_PORT" >"$TMP/otlp.log" 2>&1 <<'PY' &
import http.server, socketserver, sys
class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
    PIDS+=("$!")
    FSPT_DIR=$TMP/fsp-throttled
    mkdir -m 0700 "$FSPT_DIR" "$FSPT_DIR/audit"
    cp "$FSP_DIR/server.pem" "$FSP_DIR/server.key" "$FSP_DIR/ca.pem" "$FSP_DIR/admin-tokens" "$FSPT_DIR/"
    python3 - "$FSP_DIR/fsp.toml" "$FSPT_DIR/fsp.toml" "$FSP_PORT" "$FSPT_PORT" "$FSP_ADMIN_PORT" "$FSPT_ADMIN_PORT" "$OTLP_PORT" "$TELEMETRY" <<'PY'
import sys
src, dst, port, tport, admin, tadmin, otlp, ratio = sys.argv[1:]
t = open(src).read()
t = t.replace(f":{port}", f":{tport}").replace(f":{admin}", f":{tadmin}")
t += f'\n[telemetry]\notlp_endpoint = "http://127.0.0.1:{otlp}"\nservice_name = "fsp-loadtest"\nsampling_ratio = {ratio}\n'
open(dst, "w").write(t)
PY
    log "starting fsp with telemetry (sampling_ratio $TELEMETRY) (mTLS :$FSPT_PORT, admin :$FSPT_ADMIN_PORT)"
    "$FSP_BIN" serve --config "$FSPT_DIR/fsp.toml" >"$FSPT_DIR/fsp.log" 2>&1 &
    PIDS+=("$!")
    FSPT_PID=$!
    wait_ready fsp-throttled "${PIDS[-1]}" "https://localhost:$FSPT_PORT/" "$FSPT_DIR/fsp.log"
fi
if [[ -n $AUDIT && $SKIP_FSP != 1 ]]; then
    FSPT_DIR=$TMP/fsp-throttled
    mkdir -m 0700 "$FSPT_DIR" "$FSPT_DIR/audit"
    cp "$FSP_DIR/server.pem" "$FSP_DIR/server.key" "$FSP_DIR/ca.pem" "$FSP_DIR/admin-tokens" "$FSPT_DIR/"
    python3 - "$FSP_DIR/fsp.toml" "$FSPT_DIR/fsp.toml" "$FSP_PORT" "$FSPT_PORT" "$FSP_ADMIN_PORT" "$FSPT_ADMIN_PORT" <<'PY'
import re, sys
src, dst, port, tport, admin, tadmin = sys.argv[1:]
t = open(src).read()
t = t.replace(f":{port}", f":{tport}").replace(f":{admin}", f":{tadmin}")
t = re.sub(r"\[audit\][^\[]*", '[audit]\nbackend = "none"\nfail_closed = false\n\n', t)
open(dst, "w").write(t)
PY
    log "starting fsp without an audit trail (mTLS :$FSPT_PORT, admin :$FSPT_ADMIN_PORT)"
    "$FSP_BIN" serve --config "$FSPT_DIR/fsp.toml" >"$FSPT_DIR/fsp.log" 2>&1 &
    PIDS+=("$!")
    FSPT_PID=$!
    wait_ready fsp-throttled "${PIDS[-1]}" "https://localhost:$FSPT_PORT/" "$FSPT_DIR/fsp.log"
fi
if [[ -n $THROTTLE && $SKIP_FSP != 1 ]]; then
    case $THROTTLE in
        local) backend='backend = "local"' ;;
        redis) backend="backend = \"redis\"
url = \"$THROTTLE_REDIS_URL\"
on_backend_error = \"deny\"" ;;
        *) die "THROTTLE must be local or redis, not $THROTTLE" ;;
    esac
    FSPT_DIR=$TMP/fsp-throttled
    mkdir -m 0700 "$FSPT_DIR" "$FSPT_DIR/audit"
    cp "$FSP_DIR/server.pem" "$FSP_DIR/server.key" "$FSP_DIR/ca.pem" "$FSP_DIR/admin-tokens" "$FSPT_DIR/"
    python3 - "$FSP_DIR/fsp.toml" "$FSPT_DIR/fsp.toml" "$FSP_PORT" "$FSPT_PORT" "$FSP_ADMIN_PORT" "$FSPT_ADMIN_PORT" "$backend" <<'PY'
import sys
src, dst, port, tport, admin, tadmin, backend = sys.argv[1:]
t = open(src).read()
t = t.replace(f":{port}", f":{tport}").replace(f":{admin}", f":{tadmin}")
t = t.replace('backend = "local"', backend)
t = t.replace('name  = "Benchmark upstream"', 'name  = "Benchmark upstream"\n'
              'limit = { rate = "10000000/s", burst = 1000000 }\n'
              'consumer_limit = { rate = "10000000/s", burst = 1000000 }')
open(dst, "w").write(t)
PY
    log "starting fsp with throttling ($THROTTLE) (mTLS :$FSPT_PORT, admin :$FSPT_ADMIN_PORT)"
    "$FSP_BIN" serve --config "$FSPT_DIR/fsp.toml" >"$FSPT_DIR/fsp.log" 2>&1 &
    PIDS+=("$!")
    FSPT_PID=$!
    wait_ready fsp-throttled "${PIDS[-1]}" "https://localhost:$FSPT_PORT/" "$FSPT_DIR/fsp.log"
fi

# ---------------------------------------------------------------- targets --
declare -A URL=(
    [direct]="https://localhost:$UPSTREAM_TLS_PORT/data"
    [nginx]="https://localhost:$NGINX_PORT/data"
    [fsp]="https://localhost:$FSP_PORT/bench/echo/v1/data"
    [fsp-throttled]="https://localhost:$FSPT_PORT/bench/echo/v1/data"
    [fsp-rest]="https://localhost:$FSP_PORT/bench/echo/v1/data"
    [fsp-soap]="https://localhost:$FSP_PORT/bsoap/soap/v1"
    [fsp-soap-off]="https://localhost:$FSP_PORT/bsoapoff/soapoff/v1"
)
# Per target: what oha (and the smoke test's curl) send besides the common options
# (words without spaces).
declare -A OHA_ARGS=() CURL_ARGS=()
TARGETS=(direct nginx)
if [[ $SOAP == 1 ]]; then
    [[ $SKIP_FSP != 1 && -z $THROTTLE && -z $AUDIT ]] || die "SOAP=1 measures fsp alone: no SKIP_FSP, THROTTLE or AUDIT"
    # The consumer's 1 KiB envelope (the purpose in its SOAP Header) and 1 KiB of JSON.
    python3 - "$TMP/soap-req.xml" <<'EOF'
import sys
items = "".join(f'<b:id>{i:04d}</b:id>' for i in range(40))
head = ('<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/">'
        '<soap:Header><fsp:Purpose xmlns:fsp="urn:be:fgov:fsp:1">benchmark</fsp:Purpose></soap:Header>'
        '<soap:Body><b:getItems xmlns:b="urn:bench">')
tail = '</b:getItems></soap:Body></soap:Envelope>'
pad = 1024 - len(head + items + tail) - len("<b:note></b:note>")
s = head + items + "<b:note>" + "n" * pad + "</b:note>" + tail
assert len(s) == 1024
open(sys.argv[1], "w").write(s)
EOF
    printf '%s' "$BODY" >"$TMP/rest-req.json"
    OHA_ARGS[fsp-rest]="-m POST -D $TMP/rest-req.json -T application/json"
    CURL_ARGS[fsp-rest]="-X POST --data-binary @$TMP/rest-req.json -H Content-Type:application/json"
    for t in fsp-soap fsp-soap-off; do
        OHA_ARGS[$t]="-m POST -D $TMP/soap-req.xml -T text/xml"
        CURL_ARGS[$t]="-X POST --data-binary @$TMP/soap-req.xml -H Content-Type:text/xml"
    done
    TARGETS+=(fsp-rest fsp-soap fsp-soap-off)
else
    [[ $SKIP_FSP == 1 ]] || TARGETS+=(fsp)
    [[ -z $FSPT_PID ]] || TARGETS+=(fsp-throttled)
fi
HEADER="FSP-Purpose: benchmark"   # sent to all three, so the requests are identical

# Smoke test: one request per target must answer 200 with the upstream's body.
for t in "${TARGETS[@]}"; do
    out=$TMP/smoke-$t
    # shellcheck disable=SC2086 # CURL_ARGS holds words without spaces
    code=$(curl "${CURL_TLS[@]}" ${CURL_ARGS[$t]:-} -H "$HEADER" -o "$out" -w '%{http_code}' "${URL[$t]}" 2>"$out.err" || true)
    if [[ $code != 200 ]]; then
        log "$t: GET ${URL[$t]} answered HTTP ${code:-none} (expected 200):"
        head -c 2000 "$out" >&2 2>/dev/null || true; echo >&2
        cat "$out.err" >&2 || true
        [[ $t == fsp ]] && { log "fsp log:"; tail -n 30 "$FSP_DIR/fsp.log" >&2 || true; }
        die "$t smoke test failed"
    fi
    if [[ $t == fsp-soap* ]]; then
        grep -q '<fsp:MessageID' "$out" || die "$t answered 200 without the FSP SOAP header: $(head -c 300 "$out")"
    elif [[ $(cat "$out") != "$BODY" ]]; then
        log "WARNING: $t answered 200 but the body differs from the upstream's ($(wc -c <"$out") bytes)"
    fi
    # ... and must refuse the same request without a client certificate (mTLS is really on).
    code=$(curl -4 --http1.1 --silent --max-time 5 --cacert "$PKI/ca.pem" -H "$HEADER" -o /dev/null -w '%{http_code}' "${URL[$t]}" 2>/dev/null || true)
    [[ $code == 200 ]] && die "$t answered 200 to a request without a client certificate"
done
log "smoke test passed: ${TARGETS[*]} answer 200 with the client certificate, refuse without"

# ---------------------------------------------------------------- runs --
rm -rf -- "$RESULTS_DIR/raw"
mkdir -p "$RESULTS_DIR/raw"

OHA_COMMON=(--no-tui --http-version 1.1 --ipv4 -c "$CONCURRENCY" -w -t 10s
            --cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key" -H "$HEADER")

if [[ $INSTRUCTIONS == 1 ]]; then
    [[ $SKIP_FSP != 1 ]] || die "INSTRUCTIONS=1 measures fsp: do not set SKIP_FSP"
    OHA_COUNT=(--no-tui --http-version 1.1 --ipv4 -c 8 -t 30s --output-format quiet
               --cacert "$PKI/ca.pem" --cert "$PKI/client.pem" --key "$PKI/client.key" -H "$HEADER")
    log "instructions: $WARMUP_CALLS warm-up calls, then $CALLS counted calls (callgrind)"
    run_child oha "${OHA_COUNT[@]}" -n "$WARMUP_CALLS" "${URL[fsp]}" >/dev/null 2>&1 || die "oha warm-up failed"
    callgrind_control -z "$FSP_PID" >/dev/null || die "callgrind_control -z failed"
    run_child oha "${OHA_COUNT[@]}" -n "$CALLS" "${URL[fsp]}" >/dev/null 2>&1 || die "oha failed"
    callgrind_control -d "$FSP_PID" >/dev/null || die "callgrind_control -d failed"
    sleep 1
    dump=$(ls -t "$FSP_DIR"/callgrind.out.* 2>/dev/null | head -n 1)
    [[ -n $dump ]] || die "no callgrind dump in $FSP_DIR"
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    [[ -n $total ]] || die "no instruction total in $dump"
    printf 'fsp %s: %d instructions per call (%s instructions over %d calls, %s)\n' \
        "$FSP_VERSION" $((total / CALLS)) "$total" "$CALLS" "$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    exit 0
fi

busy=$(pgrep -c -x 'rustc|cargo|cc1|cc1plus|ld|lld|mold' 2>/dev/null || true)
if (( busy > 0 )); then
    log "WARNING: $busy compiler/linker processes are running; figures will be noisy (2-core machine?)"
fi
read -r LOADAVG _ < /proc/loadavg || LOADAVG=unknown

check_alive() {  # check_alive WHEN: every server we started must still be running
    local name pid logf
    for name in upstream nginx-proxy fsp fsp-throttled; do
        case $name in
            upstream)    pid=$UPSTREAM_PID logf=$UP_DIR/error.log ;;
            nginx-proxy) pid=$PROXY_PID    logf=$PX_DIR/error.log ;;
            fsp)         pid=$FSP_PID      logf=${FSP_DIR:-}/fsp.log ;;
            fsp-throttled) pid=$FSPT_PID   logf=${FSPT_DIR:-}/fsp.log ;;
        esac
        [[ -n $pid ]] || continue
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) stopped $1; last log lines:"
            tail -n 30 "$logf" >&2 2>/dev/null || true
            die "$name is no longer running; results discarded (was it killed by something else?)"
        fi
    done
}

cpu_ticks() {  # cpu_ticks PID: user+system CPU of PID (all threads) and its children, in clock ticks
    local total=0 p st f
    [[ -n $1 ]] || { echo 0; return; }
    for p in "$1" $(ps -o pid= --ppid "$1" 2>/dev/null); do
        st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a f <<<"${st##*) }"        # f[0] is field 3 (state): utime is f[11], stime f[12]
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
host_busy_ticks() {  # CPU busy time of the whole machine (all cores), in clock ticks
    local _cpu user nice system _idle _iowait irq softirq steal _rest
    read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}
CHILDREN_MS=0
children_ms() {  # CHILDREN_MS := user+system CPU of this shell's waited-for children (oha), in ms
    # `times` must run in this shell, not in a $(...) subshell, to see our children.
    local line total=0 t
    times >"$TMP/times"
    line=$(tail -n 1 "$TMP/times")
    for t in $line; do
        [[ $t =~ ^([0-9]+)m([0-9]+)\.([0-9]{3})s$ ]] || continue
        total=$((total + BASH_REMATCH[1] * 60000 + 10#${BASH_REMATCH[2]} * 1000 + 10#${BASH_REMATCH[3]}))
    done
    CHILDREN_MS=$total
}
cpu_snapshot() {
    echo "$(cpu_ticks "$UPSTREAM_PID") $(cpu_ticks "$PROXY_PID") $(cpu_ticks "$FSP_PID") $(cpu_ticks "$FSPT_PID") $(host_busy_ticks)"
}
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

log "workload: GET, HTTP/1.1 keep-alive, $CONCURRENCY connections, ${WARMUP}s warm-up + ${DURATION}s measured, per target, $ROUNDS round(s)"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        if (( WARMUP > 0 )); then
            log "round $r/$ROUNDS $t: warm-up ${WARMUP}s"
            # shellcheck disable=SC2086 # OHA_ARGS holds words without spaces
            run_child timeout $((WARMUP + 30)) oha "${OHA_COMMON[@]}" ${OHA_ARGS[$t]:-} -z "${WARMUP}s" --output-format quiet "${URL[$t]}" >/dev/null 2>&1 \
                || die "$t: oha warm-up failed"
        fi
        log "round $r/$ROUNDS $t: measuring ${DURATION}s"
        raw=$RESULTS_DIR/raw/$t-r$r.json
        read -r cu0 cp0 cf0 ct0 ch0 <<<"$(cpu_snapshot)"; children_ms; cl0=$CHILDREN_MS
        # shellcheck disable=SC2086
        run_child timeout $((DURATION + 60)) oha "${OHA_COMMON[@]}" ${OHA_ARGS[$t]:-} -z "${DURATION}s" --output-format json -o "$raw" "${URL[$t]}" \
            || die "$t: oha failed"
        read -r cu1 cp1 cf1 ct1 ch1 <<<"$(cpu_snapshot)"; children_ms; cl1=$CHILDREN_MS
        [[ -s $raw ]] || die "$t: oha wrote no results"
        check_alive "during the $t run"
        # server-side CPU seconds used during the measured run, per process group
        # (ticks; loadgen in ms; host_busy: the whole machine, to spot other load during the run)
        printf '{"clk_tck": %d, "upstream": %d, "nginx_proxy": %d, "fsp": %d, "fsp_throttled": %d, "host_busy": %d, "loadgen_ms": %d}\n' \
            "$CLK_TCK" $((cu1 - cu0)) $((cp1 - cp0)) $((cf1 - cf0)) $((ct1 - ct0)) $((ch1 - ch0)) $((cl1 - cl0)) >"${raw%.json}.cpu.json"
    done
done

if [[ $SKIP_FSP != 1 ]] && grep -qiE 'error|panic' "$FSP_DIR/fsp.log"; then
    log "fsp logged errors (first 20 lines with error/panic):"
    grep -iE 'error|panic' "$FSP_DIR/fsp.log" | head -n 20 >&2 || true
fi

# ---------------------------------------------------------------- report --
export RESULTS_DIR ROUNDS CONCURRENCY DURATION WARMUP MIN_RPS_RATIO MAX_P99_RATIO FSP_VERSION LOADAVG SKIP_FSP
export TARGETS_LIST="${TARGETS[*]}"
export NGINX_VERSION; NGINX_VERSION=$(nginx -v 2>&1 | sed 's/^nginx version: //')
export OHA_VERSION; OHA_VERSION=$(oha --version 2>/dev/null || echo unknown)
export GIT_REV; GIT_REV=$(git -C "$REPO_ROOT" describe --always --dirty 2>/dev/null || echo unknown)
export URL_DIRECT=${URL[direct]} URL_NGINX=${URL[nginx]} URL_FSP=${URL[fsp]} URL_FSP_THROTTLED=${URL[fsp-throttled]} THROTTLE AUDIT TELEMETRY
export URL_FSP_REST=${URL[fsp-rest]} URL_FSP_SOAP=${URL[fsp-soap]} URL_FSP_SOAP_OFF=${URL[fsp-soap-off]} SOAP

set +e
python3 - <<'EOF'
import json, os, platform, statistics, sys, time

E = os.environ
rounds = int(E["ROUNDS"])
targets = E["TARGETS_LIST"].split()
res_dir = E["RESULTS_DIR"]
min_rps, max_p99 = float(E["MIN_RPS_RATIO"]), float(E["MAX_P99_RATIO"])

FRONT = {"direct": "upstream", "nginx": "nginx_proxy", "fsp": "fsp",
         "fsp-throttled": "fsp_throttled", "fsp-rest": "fsp", "fsp-soap": "fsp",
         "fsp-soap-off": "fsp"}  # process terminating mTLS
per = {}
invalid = []
for t in targets:
    runs = []
    for r in range(1, rounds + 1):
        path = os.path.join(res_dir, "raw", f"{t}-r{r}.json")
        with open(path) as f:
            d = json.load(f)
        lp = d["latencyPercentiles"]
        codes = {str(k): int(v) for k, v in (d.get("statusCodeDistribution") or {}).items()}
        errors = {str(k): int(v) for k, v in (d.get("errorDistribution") or {}).items()}
        total = sum(codes.values()) + sum(errors.values())
        cpu_path = path[:-len(".json")] + ".cpu.json"
        with open(cpu_path) as f:
            cpu = json.load(f)
        tck = cpu["clk_tck"]
        front_s = cpu[FRONT[t]] / tck
        upstream_s = cpu["upstream"] / tck
        elapsed = d["summary"]["total"]
        ours_s = (cpu["upstream"] + cpu["nginx_proxy"] + cpu["fsp"] + cpu.get("fsp_throttled", 0)) / tck \
            + cpu["loadgen_ms"] / 1000
        other_cores = max(0.0, cpu["host_busy"] / tck - ours_s) / elapsed if elapsed else None
        run = {
            "round": r,
            "raw": os.path.relpath(path, res_dir),
            "requests": total,
            "rps": d["summary"]["requestsPerSec"],
            "p50_ms": (lp.get("p50") or 0) * 1000,
            "p99_ms": (lp.get("p99") or 0) * 1000,
            "front_cpu_s": front_s,
            "front_cpu_us_per_req": front_s * 1e6 / total if total else None,
            "front_cores": front_s / elapsed if elapsed else None,
            "upstream_cpu_us_per_req": upstream_s * 1e6 / total if total and t != "direct" else None,
            "loadgen_cores": cpu["loadgen_ms"] / 1000 / elapsed if elapsed else None,
            "other_cores": other_cores,
            "status_codes": codes,
            "errors": errors,
        }
        non200 = total - codes.get("200", 0)
        if non200:
            invalid.append(f"{t} round {r}: {non200} of {total} responses were not 200 "
                           f"(status codes {codes}, errors {errors})")
        runs.append(run)
    def med(k):
        v = [x[k] for x in runs if x[k] is not None]
        return statistics.median(v) if v else None
    per[t] = {"url": E.get("URL_" + t.upper().replace("-", "_")), "rps": med("rps"), "p50_ms": med("p50_ms"),
              "p99_ms": med("p99_ms"), "front_process": FRONT[t],
              "front_cpu_us_per_req": med("front_cpu_us_per_req"), "front_cores": med("front_cores"),
              "upstream_cpu_us_per_req": med("upstream_cpu_us_per_req"),
              "loadgen_cores": med("loadgen_cores"), "other_cores_max": max(
                  (x["other_cores"] for x in runs if x["other_cores"] is not None), default=None),
              "requests": sum(x["requests"] for x in runs),
              "all_200": all(x["requests"] == x["status_codes"].get("200", 0) for x in runs),
              "runs": runs}

def div(a, b):
    return a / b if a is not None and b else None

ratios, checks = {}, {}
if "fsp" in per:
    f, n, d = per["fsp"], per["nginx"], per["direct"]
    ratios = {
        "fsp_nginx_rps": div(f["rps"], n["rps"]),
        "fsp_nginx_p99": div(f["p99_ms"], n["p99_ms"]),
        "fsp_nginx_p50": div(f["p50_ms"], n["p50_ms"]),
        "fsp_direct_rps": div(f["rps"], d["rps"]),
        "fsp_direct_p99": div(f["p99_ms"], d["p99_ms"]),
        "fsp_nginx_cpu_per_req": div(f["front_cpu_us_per_req"], n["front_cpu_us_per_req"]),
    }
    # PASS/MISS only means something when both sides answered 200 throughout.
    comparable = f["all_200"] and n["all_200"]
    checks = {
        "throughput": {"target": f">= {min_rps} x nginx", "ratio": ratios["fsp_nginx_rps"],
                       "pass": (ratios["fsp_nginx_rps"] >= min_rps) if comparable else None},
        "p99": {"target": f"<= {max_p99} x nginx", "ratio": ratios["fsp_nginx_p99"],
                "pass": (ratios["fsp_nginx_p99"] <= max_p99) if comparable else None},
    }
if "fsp-throttled" in per and "fsp" in per:
    ft, f = per["fsp-throttled"], per["fsp"]
    ratios["throttled_fsp_rps"] = div(ft["rps"], f["rps"])
    ratios["throttled_fsp_p99"] = div(ft["p99_ms"], f["p99_ms"])
    ratios["throttled_fsp_cpu_per_req"] = div(ft["front_cpu_us_per_req"], f["front_cpu_us_per_req"])
if "fsp-soap" in per:
    s_on, s_off, rest = per["fsp-soap"], per["fsp-soap-off"], per["fsp-rest"]
    ratios["soap_checks_on_off_rps"] = div(s_on["rps"], s_off["rps"])
    ratios["soap_checks_on_off_p99"] = div(s_on["p99_ms"], s_off["p99_ms"])
    ratios["soap_checks_on_off_cpu_per_req"] = div(s_on["front_cpu_us_per_req"], s_off["front_cpu_us_per_req"])
    ratios["soap_rest_rps"] = div(s_on["rps"], rest["rps"])
    ratios["soap_rest_cpu_per_req"] = div(s_on["front_cpu_us_per_req"], rest["front_cpu_us_per_req"])
    comparable = s_on["all_200"] and s_off["all_200"]
    checks["soap_xml_checks"] = {"target": ">= 0.9 x checks off", "ratio": ratios["soap_checks_on_off_rps"],
                                 "pass": (ratios["soap_checks_on_off_rps"] >= 0.9) if comparable else None}
ratios["nginx_direct_rps"] = div(per["nginx"]["rps"], per["direct"]["rps"])
ratios["nginx_direct_p99"] = div(per["nginx"]["p99_ms"], per["direct"]["p99_ms"])

summary = {
    "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "git": E["GIT_REV"],
    "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "loadavg_before": E["LOADAVG"]},
    "tools": {"oha": E["OHA_VERSION"], "nginx": E["NGINX_VERSION"], "fsp": E["FSP_VERSION"]},
    "workload": {"method": "GET", "http": "1.1 keep-alive", "tls": "mTLS (EC P-256)",
                 "response_bytes": 1024, "concurrency": int(E["CONCURRENCY"]),
                 "duration_s": int(E["DURATION"]), "warmup_s": int(E["WARMUP"]), "rounds": rounds},
    "targets": per,
    "ratios": ratios,
    "checks": checks,
    "valid": not invalid,
    "problems": invalid,
}
with open(os.path.join(res_dir, "latest.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
    fh.write("\n")

agg = "median of %d rounds" % rounds if rounds > 1 else "1 round"
print()
what = ("direct and nginx: mTLS REST GET, 1 KiB JSON; fsp-*: POST of 1 KiB (see below)"
        if E.get("SOAP") == "1" else "mTLS REST GET, 1 KiB JSON")
print(f"{what}, HTTP/1.1 keep-alive, c={E['CONCURRENCY']}, "
      f"{E['DURATION']}s per target ({agg}), load avg before: {E['LOADAVG']}")
print()
fmt = lambda v, spec: format(v, spec) if v is not None else format("-", spec.split(".")[0])
print(f"{'target':<13} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'requests':>10}  {'all 200':>7}"
      f"  {'CPU us/req':>10} {'cores':>6} {'upstr us/req':>12} {'oha cores':>9} {'other':>6}")
print("-" * 110)
for t in targets:
    p = per[t]
    print(f"{t:<13} {p['rps']:>10.0f} {p['p50_ms']:>9.3f} {p['p99_ms']:>9.3f} {p['requests']:>10}  "
          f"{'yes' if p['all_200'] else 'NO':>7}  {fmt(p['front_cpu_us_per_req'], '>10.1f')} "
          f"{fmt(p['front_cores'], '>6.2f')} {fmt(p['upstream_cpu_us_per_req'], '>12.1f')} "
          f"{fmt(p['loadgen_cores'], '>9.2f')} {fmt(p['other_cores_max'], '>6.2f')}")
print("(CPU us/req, cores: CPU of the process terminating mTLS (upstream nginx for direct, proxy nginx,"
      " fsp) per request and on average during the run; upstr: the upstream nginx behind it;"
      " other: cores used by processes outside the benchmark, worst round)")
noisy = [t for t in targets if (per[t]["other_cores_max"] or 0) > 0.25]
if noisy:
    print(f"WARNING: other processes used > 0.25 core during the {', '.join(noisy)} run(s): "
          "figures are disturbed; run again on an idle machine")
print()
if "fsp" in per:
    mark = lambda ok: "INVALID (not all 200)" if ok is None else ("PASS" if ok else "MISS")
    r = lambda k: fmt(ratios[k], "6.3f")
    print(f"fsp / nginx  throughput  {r('fsp_nginx_rps')}   target >= {min_rps:<4}  {mark(checks['throughput']['pass'])}")
    print(f"fsp / nginx  p99         {r('fsp_nginx_p99')}   target <= {max_p99:<4}  {mark(checks['p99']['pass'])}")
    print(f"fsp / nginx  p50         {r('fsp_nginx_p50')}")
    print(f"fsp / direct throughput  {r('fsp_direct_rps')}")
    print(f"fsp / direct p99         {r('fsp_direct_p99')}")
    print(f"fsp / nginx  CPU per req {r('fsp_nginx_cpu_per_req')}")
elif "fsp-soap" in per:
    mark = lambda ok: "INVALID (not all 200)" if ok is None else ("PASS" if ok else "MISS")
    r = lambda k: fmt(ratios[k], "6.3f")
    print("SOAP: POST of a 1 KiB envelope answered by a 1 KiB envelope; REST: POST of 1 KiB JSON answered by 1 KiB JSON")
    print(f"SOAP checks on/off throughput  {r('soap_checks_on_off_rps')}   target >= 0.9   {mark(checks['soap_xml_checks']['pass'])}")
    print(f"SOAP checks on/off p99         {r('soap_checks_on_off_p99')}")
    print(f"SOAP checks on/off CPU per req {r('soap_checks_on_off_cpu_per_req')}")
    print(f"SOAP / REST        throughput  {r('soap_rest_rps')}")
    print(f"SOAP / REST        CPU per req {r('soap_rest_cpu_per_req')}")
else:
    print("fsp skipped (SKIP_FSP=1): no fsp ratios")
if "throttled_fsp_rps" in ratios and E.get("TELEMETRY"):
    mark = "PASS" if (ratios['throttled_fsp_rps'] or 0) >= 0.95 else "MISS"
    print(f"telemetry (sampling {E['TELEMETRY']}) on/off throughput  {fmt(ratios['throttled_fsp_rps'], '6.3f')}   target >= 0.95   {mark}")
    print(f"telemetry (sampling {E['TELEMETRY']}) on/off p99         {fmt(ratios['throttled_fsp_p99'], '6.3f')}")
    print(f"telemetry (sampling {E['TELEMETRY']}) on/off CPU per req {fmt(ratios['throttled_fsp_cpu_per_req'], '6.3f')}")
elif "throttled_fsp_rps" in ratios and E.get("AUDIT"):
    kind = "file" if E["AUDIT"] == "off" else E["AUDIT"]
    print(f"audit ({kind}, write-ahead) on/off throughput  {fmt(ratios['throttled_fsp_rps'] and 1 / ratios['throttled_fsp_rps'], '6.3f')}")
    print(f"audit ({kind}, write-ahead) on/off p99         {fmt(ratios['throttled_fsp_p99'] and 1 / ratios['throttled_fsp_p99'], '6.3f')}")
    print(f"audit ({kind}, write-ahead) on/off CPU per req {fmt(ratios['throttled_fsp_cpu_per_req'] and 1 / ratios['throttled_fsp_cpu_per_req'], '6.3f')}")
elif "throttled_fsp_rps" in ratios:
    print(f"throttling ({E['THROTTLE']}) on/off throughput  {fmt(ratios['throttled_fsp_rps'], '6.3f')}")
    print(f"throttling ({E['THROTTLE']}) on/off p99         {fmt(ratios['throttled_fsp_p99'], '6.3f')}")
    print(f"throttling ({E['THROTTLE']}) on/off CPU per req {fmt(ratios['throttled_fsp_cpu_per_req'], '6.3f')}")
print(f"nginx/direct throughput  {fmt(ratios['nginx_direct_rps'], '6.3f')}")
print(f"nginx/direct p99         {fmt(ratios['nginx_direct_p99'], '6.3f')}")
print()
print(f"summary: {os.path.join(res_dir, 'latest.json')}   raw oha JSON: {os.path.join(res_dir, 'raw')}/")
if invalid:
    print()
    print("INVALID RUN: not every response was 200:")
    for line in invalid:
        print("  " + line)
    sys.exit(3)
EOF
status=$?
set -e
# keep a dated copy of the summary next to latest.json
[[ -f $RESULTS_DIR/latest.json ]] && cp "$RESULTS_DIR/latest.json" "$RESULTS_DIR/summary-$(date +%Y%m%dT%H%M%S).json"
exit "$status"
