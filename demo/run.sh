#!/usr/bin/env bash
# `make demo`: the five-step journey of issue 4, without Kubernetes.
#
# OpenBao (dev mode) holds a secret. The broker (`credbroker-sidecar local`)
# logs in with AppRole, reads the secret, and swaps it in for a placeholder
# as the agent's request (curl) leaves for a recording HTTPS upstream. Then
# the secret is rotated in OpenBao and the broker uses the new version
# without a restart.
#
# Needs only what `make setup` installs: bao ($CREDBROKER_BAO), curl and
# python3, plus the two binaries `make demo` builds. Everything listens on
# 127.0.0.1 and lives in a temporary folder; the processes this script
# starts and the folder are gone when it exits, whichever way it exits.
#
# Environment (all optional):
#   CREDBROKER_BAO       the bao binary (else bao on PATH)
#   DEMO_SIDECAR_BIN     credbroker-sidecar (else $CARGO_TARGET_DIR/debug/...,
#                        CARGO_TARGET_DIR defaulting to target/)
#   DEMO_UPSTREAM_BIN    credbroker-demo-upstream (likewise)
#   DEMO_BROKER_LOG      a file for the broker's log and audit records, kept
#                        after the demo (else one in the temporary folder)
#   DEMO_KEY_V1, DEMO_KEY_V2
#                        the secret's value before and after the rotation
#                        (else demo-key-v1-<random hex>, demo-key-v2-<...>)
#
# It exits non-zero, naming the step that failed, if anything goes wrong.
set -euo pipefail
export LC_ALL=C

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bao_bin=${CREDBROKER_BAO:-$(command -v bao || true)}
sidecar_bin=${DEMO_SIDECAR_BIN:-$target/debug/credbroker-sidecar}
upstream_bin=${DEMO_UPSTREAM_BIN:-$target/debug/credbroker-demo-upstream}
broker_log=${DEMO_BROKER_LOG:-}
key_v1=${DEMO_KEY_V1:-}
key_v2=${DEMO_KEY_V2:-}

# The demo talks only to its own processes on loopback: nothing inherited
# may point bao at another server, curl at another proxy, or change how the
# broker runs (it reads CREDBROKER_* for its flags).
while read -r name; do
  case $name in
    VAULT_* | BAO_* | CREDBROKER_* | RUST_LOG | [Hh][Tt][Tt][Pp]_[Pp][Rr][Oo][Xx][Yy] | \
      [Hh][Tt][Tt][Pp][Ss]_[Pp][Rr][Oo][Xx][Yy] | [Aa][Ll][Ll]_[Pp][Rr][Oo][Xx][Yy] | \
      [Nn][Oo]_[Pp][Rr][Oo][Xx][Yy] | CURL_CA_BUNDLE)
      unset "$name" ;;
  esac
done < <(compgen -e)

# --- narration and failure ---------------------------------------------------

if [[ -t 1 ]]; then bold=$'\e[1m' plain=$'\e[0m'; else bold='' plain=''; fi
phase="check what the demo needs"
reported=no
work=''
pids=()
last_answer=''
exit_status=0

banner() { # banner N TITLE: a numbered step of the journey
  phase="step $1/5: $2"
  printf '\n%s==> step %s/5: %s%s\n' "$bold" "$1" "$2" "$plain"
}
setup() { # setup TITLE [DETAIL]: a setting-up phase before the journey
  phase=$1
  printf '%s--> %s%s%s\n' "$bold" "$1" "${2:+ ($2)}" "$plain"
}
say() { printf '    %s\n' "$@"; }
indent() { sed 's/^/        /'; }
quietly() { # quietly COMMAND...: prints the command, runs it, hides its output
  printf '    $ %s\n' "$*"
  "$@" >/dev/null
}
visibly() { # visibly COMMAND...: prints the command, runs it, shows its output
  printf '    $ %s\n' "$*"
  "$@" | indent
}
tail_of() { # tail_of FILE WHAT: the end of a process's output, for a failure
  if [[ -s $1 ]]; then
    printf '%s, last lines:\n' "$2" >&2
    tail -n 25 "$1" | sed 's/^/    | /' >&2
  fi
}
fail() { # fail MESSAGE...: stops the demo, naming the step
  reported=yes
  printf '\nmake demo: FAILED at "%s": %s\n' "$phase" "$*" >&2
  exit 1
}

alive() { # alive PID: running (a zombie is not)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) } # the state follows the "(command name)"
  [[ ${stat:0:1} != Z ]]
}
reap() { # reap PID: waits for an exited child; sets $exit_status
  exit_status=0
  wait "$1" 2>/dev/null || exit_status=$?
  local kept=() p
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  pids=("${kept[@]}")
}

cleanup() {
  local status=$?
  # A second Ctrl-C must not cut the clean-up short and leave processes.
  trap - EXIT
  trap '' INT TERM
  if ((status == 130 || status == 143)) && [[ $reported == no ]]; then
    printf '\nmake demo: stopped by a signal during "%s"\n' "$phase" >&2
  elif ((status != 0)) && [[ $reported == no ]]; then
    printf '\nmake demo: FAILED at "%s" (a command failed with status %s; see above)\n' \
      "$phase" "$status" >&2
  fi
  # Last started, first stopped: the broker revokes its Vault token on the
  # way out, so OpenBao must still be there.
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in {1..50}; do alive "$pid" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n $work ]]; then rm -rf -- "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_until() { # wait_until SECONDS PID LOG WHAT COMMAND...: until COMMAND succeeds
  local seconds=$1 pid=$2 log=$3 what=$4
  local deadline=$((SECONDS + seconds))
  shift 4
  until "$@"; do
    if ! alive "$pid"; then
      reap "$pid"
      tail_of "$log" "$what"
      fail "$what exited (status $exit_status) before it was ready"
    fi
    if ((SECONDS >= deadline)); then
      tail_of "$log" "$what"
      fail "$what was not ready within ${seconds}s${last_answer:+ (last answer: $last_answer)}"
    fi
    sleep 0.1
  done
}

ms_since() { # ms_since EPOCHREALTIME-VALUE
  local now=$EPOCHREALTIME
  printf '%d' $(((${now//[.,]/} - ${1//[.,]/}) / 1000))
}
clock() { # clock EPOCHREALTIME-VALUE: HH:MM:SS.mmm
  local whole=${1%[.,]*} frac=${1#*[.,]}
  printf '%(%H:%M:%S)T.%s' "$whole" "${frac:0:3}"
}

# --- what the demo needs -----------------------------------------------------

[[ -n $bao_bin && -x $bao_bin ]] ||
  fail "no bao binary (${bao_bin:-CREDBROKER_BAO is not set and none is on PATH}): run \`make setup\`, then \`set -a; source target/credbroker-test.env; set +a\` (\`make demo\` does both)"
for tool in curl python3 od; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run \`make setup\`"
done
for bin in "$sidecar_bin" "$upstream_bin"; do
  [[ -x $bin ]] ||
    fail "$bin is missing: run \`cargo build -p credbroker-sidecar -p credbroker-demo\` (\`make demo\` does)"
done
random_hex() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
key_v1=${key_v1:-demo-key-v1-$(random_hex)}
key_v2=${key_v2:-demo-key-v2-$(random_hex)}
for key in "$key_v1" "$key_v2"; do
  [[ $key =~ ^[A-Za-z0-9._~+/=-]{8,200}$ ]] ||
    fail "DEMO_KEY_V1 and DEMO_KEY_V2 must be 8 to 200 characters of A-Z a-z 0-9 ._~+/=-"
done
[[ $key_v1 != "$key_v2" && $key_v1 != *"$key_v2"* && $key_v2 != *"$key_v1"* ]] ||
  fail "DEMO_KEY_V1 and DEMO_KEY_V2 must differ, and neither may contain the other"

work=$(mktemp -d "${TMPDIR:-/tmp}/credbroker-demo.XXXXXX")
mkdir -m 700 "$work/home"
broker_log=${broker_log:-$work/broker.log}
: >"$broker_log"
# Four free loopback ports, held together so they differ.
ports=$(python3 -c '
import socket
held = [socket.socket() for _ in range(4)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))
')
read -r bao_port upstream_port listen_port admin_port <<<"$ports"
bao_addr=http://127.0.0.1:$bao_port
admin=http://127.0.0.1:$admin_port
root_token=demo-root-$(random_hex)

printf '%scredbroker demo: a secret in OpenBao, an agent that only ever holds a placeholder,\n' "$bold"
printf 'and a broker that puts the real value on the wire, only toward its upstream.%s\n\n' "$plain"

# --- set up: OpenBao, the upstream, the broker -------------------------------

setup "start OpenBao" "dev mode, in memory, on $bao_addr"
HOME=$work/home "$bao_bin" server -dev -dev-listen-address="127.0.0.1:$bao_port" \
  -dev-root-token-id="$root_token" >"$work/bao.log" 2>&1 &
pids+=("$!")
bao_pid=$!
bao_healthy() { curl -fsS --max-time 2 -o /dev/null "$bao_addr/v1/sys/health" 2>/dev/null; }
wait_until 30 "$bao_pid" "$work/bao.log" "OpenBao" bao_healthy
bao() { HOME=$work/home BAO_ADDR=$bao_addr BAO_TOKEN=$root_token "$bao_bin" "$@"; }

setup "write the secret, and an AppRole login that may read only it"
# The value goes in on stdin (api_key=-), not on a command line.
printf '%s' "$key_v1" | quietly bao kv put -mount=secret demo/upstream api_key=-
# Vault reads JSON policies as they are: no HCL is built from strings here.
cat >"$work/policy.json" <<'EOF'
{
  "path": {
    "secret/data/demo/upstream": { "capabilities": ["read"] },
    "secret/metadata/demo/upstream": { "capabilities": ["read"] },
    "auth/token/lookup-self": { "capabilities": ["read"] },
    "auth/token/renew-self": { "capabilities": ["update"] },
    "auth/token/revoke-self": { "capabilities": ["update"] }
  }
}
EOF
quietly bao auth enable approle
quietly bao policy write credbroker-demo "$work/policy.json"
quietly bao write auth/approle/role/credbroker-demo token_policies=credbroker-demo \
  token_no_default_policy=true token_ttl=5m token_max_ttl=1h
role_id=$(bao read -field=role_id auth/approle/role/credbroker-demo/role-id)
(
  umask 077
  bao write -f -field=secret_id auth/approle/role/credbroker-demo/secret-id >"$work/secret-id"
)
chmod 600 "$work/secret-id"
say "role_id $role_id; its secret_id is in a file only this user can read"

setup "start the recording upstream" "https://localhost:$upstream_port"
upstream_log=$work/upstream.log
"$upstream_bin" --listen "127.0.0.1:$upstream_port" --name localhost \
  --ca-file "$work/upstream-ca.pem" >"$upstream_log" 2>&1 &
pids+=("$!")
upstream_pid=$!
wait_until 20 "$upstream_pid" "$upstream_log" "the upstream" test -s "$work/upstream-ca.pem"
upstream_seen=$(wc -l <"$upstream_log")

setup "start the broker" "proxy on 127.0.0.1:$listen_port, admin on $admin"
placeholder=$("$sidecar_bin" placeholder --prefix sk-demo-)
[[ $placeholder =~ ^[A-Za-z0-9_-]+$ ]] || fail "credbroker-sidecar placeholder printed something unexpected"
cat >"$work/credbroker.yaml" <<EOF
formatVersion: 1
bindings:
  - id: demo
    secret: { mount: secret, path: demo/upstream, key: api_key, kvVersion: 2 }
    destinations: [ { host: localhost, port: $upstream_port } ]
    refreshInterval: 2s
placeholders:
  demo: $placeholder
EOF
say "the agent's placeholder: $placeholder"
HOME=$work/home RUST_LOG=info "$sidecar_bin" local --config "$work/credbroker.yaml" \
  --listen "127.0.0.1:$listen_port" --admin-addr "127.0.0.1:$admin_port" \
  --ca-dir "$work/ca" --bundle-dir "$work/trust" --extra-ca-file "$work/upstream-ca.pem" \
  --drain-timeout 1s \
  --secret-source vault --vault-addr "$bao_addr" --vault-allow-http \
  --vault-auth approle --vault-role-id "$role_id" --vault-secret-id-file "$work/secret-id" \
  >"$broker_log" 2>&1 &
pids+=("$!")
broker_pid=$!
broker_ready() {
  local code
  code=$(curl -sS --max-time 2 -o "$work/readyz" -w '%{http_code}' "$admin/readyz" 2>/dev/null) || code=000
  [[ $code == 200 ]] && return 0
  last_answer="$code $(head -c 300 "$work/readyz" 2>/dev/null | tr '\n' ' ')"
  last_answer=${last_answer% }
  return 1
}
wait_until 20 "$broker_pid" "$broker_log" "the broker" broker_ready

# --- the journey ---------------------------------------------------------------

# Upstream lines that arrived since the last call, into $arrived.
arrived=()
read_upstream() {
  mapfile -t arrived < <(tail -n "+$((upstream_seen + 1))" "$upstream_log")
  upstream_seen=$((upstream_seen + ${#arrived[@]}))
}
arrived_has() { # arrived_has TEXT: whether one of $arrived holds TEXT
  local line
  for line in "${arrived[@]}"; do [[ $line == *"$1"* ]] && return 0; done
  return 1
}
print_arrived() { # print_arrived [NOTE]: the lines in $arrived, each followed by NOTE
  local line
  for line in "${arrived[@]}"; do printf '        %s%s\n' "$line" "${1:+   $1}"; done
}
# One request as the agent makes it: through the proxy, trusting the
# broker's bundle, carrying the placeholder. Sets $agent_status and leaves
# the body in $work/agent.out.
agent_request() {
  agent_status=$(curl -sS --max-time 10 --proxy "http://127.0.0.1:$listen_port" \
    --cacert "$work/trust/ca-bundle.crt" -H "Authorization: Bearer $placeholder" \
    -o "$work/agent.out" -w '%{http_code}' "https://localhost:$upstream_port/v1/models" \
    2>"$work/agent.err") || agent_status="curl failed: $(tr '\n' ' ' <"$work/agent.err")"
}
agent_saw_a_value() { grep -qF -e "$key_v1" -e "$key_v2" "$work/agent.out" "$work/agent.err"; }
# Reads the demo binding from the broker's /status into $state, $version,
# $fingerprint and $source (and $problem, when it is not ready): only those
# fields, never anything else the answer might hold.
read_status() {
  local code
  code=$(curl -sS --max-time 5 -o "$work/status.json" -w '%{http_code}' "$admin/status" \
    2>"$work/status.err") || fail "GET $admin/status failed: $(cat "$work/status.err")"
  [[ $code == 200 ]] ||
    fail "GET $admin/status answered $code: $(head -c 300 "$work/status.json")"
  python3 -c '
import json, sys
try:
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    found = [b for b in doc["bindings"] if b["id"] == "demo"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"not the JSON expected ({type(e).__name__}: {e})")
if not found:
    sys.exit("it lists no binding \"demo\"")
b = found[0]
problem = " ".join(f"{k}: {b[k]}" for k in ("step", "reason") if k in b)
fields = (doc.get("source"), b.get("state"), b.get("version"), b.get("fingerprint"), problem)
print("\t".join(" ".join(str(x).split()) for x in fields))
' "$work/status.json" >"$work/status.fields" 2>"$work/status.err" ||
    fail "GET $admin/status: $(cat "$work/status.err")"
  IFS=$'\t' read -r source state version fingerprint problem <"$work/status.fields"
}
show_status() {
  say "source       $source" "binding      demo" "state        $state" "version      $version" \
    "fingerprint  $fingerprint   (identifies the value; it is not the value)"
}

banner 1 "the secret, as Vault shows it"
say "A demo value: showing it here is the point. The agent never gets it."
visibly bao kv get -mount=secret demo/upstream

banner 2 "the broker's view of it (GET $admin/status)"
read_status
show_status
[[ $source == vault && $state == ready && $version == 1 ]] ||
  fail "the broker should be ready with version 1 from vault; it says $state, version $version from $source${problem:+ ($problem)}"
fingerprint1=$fingerprint
say "No value in sight: the broker shows which version it holds, not what it is."

banner 3 "the agent calls the upstream with its placeholder"
say "agent sends: GET https://localhost:$upstream_port/v1/models (through the broker)" \
  "             Authorization: Bearer $placeholder"
agent_request
[[ $agent_status == 200 ]] || {
  tail_of "$broker_log" "the broker's log"
  fail "the agent's request got $agent_status: $(head -c 500 "$work/agent.out")"
}
agent_body=$(head -c 300 "$work/agent.out" | tr '\n' ' ')
say "agent got:   HTTP $agent_status ${agent_body% }"
read_upstream
say "and the upstream printed:"
print_arrived
arrived_has "Bearer $key_v1" || fail "the upstream did not get the real value from Vault"
! arrived_has "$placeholder" ||
  fail "the upstream got the placeholder: the broker did not swap it"
! agent_saw_a_value || fail "the agent's answer holds the real value"
say "The agent sent and saw only the placeholder; the upstream got the key from Vault."

banner 4 "rotate the secret in Vault"
printf '%s' "$key_v2" | visibly bao kv put -mount=secret demo/upstream api_key=-
written=$EPOCHREALTIME
say "written at $(clock "$written"): api_key is now a new value (demo-key-v2-...)." \
  "Nothing tells the broker; it polls the secret's metadata every refreshInterval (2s)."

banner 5 "the broker picks up the new version, without a restart"
say "the agent repeats its request every 200 ms (always with the same placeholder):"
requests=0
took=''
while [[ -z $took ]]; do
  requests=$((requests + 1))
  agent_request
  [[ $agent_status == 200 ]] || {
    tail_of "$broker_log" "the broker's log"
    fail "request $requests after the rotation got $agent_status: $(head -c 500 "$work/agent.out")"
  }
  ! agent_saw_a_value || fail "the agent's answer holds a real value"
  elapsed=$(ms_since "$written")
  read_upstream
  print_arrived "(+$elapsed ms)"
  if arrived_has "Bearer $key_v2"; then
    took=$elapsed
  elif ((elapsed > 15000)); then
    fail "the upstream still got the old value 15 s after the rotation"
  else
    sleep 0.2
  fi
done
say "The upstream got version 2 ${took} ms after the write, on request $requests;" \
  "every request was answered, and the agent's placeholder never changed."
# The upstream saw the new value, so the broker holds it; its status may
# trail by a moment.
for _ in {1..30}; do
  read_status
  [[ $version == 2 ]] && break
  sleep 0.1
done
say "/status now:"
show_status
[[ $state == ready && $version == 2 ]] ||
  fail "the broker should be ready with version 2; it says $state, version $version${problem:+ ($problem)}"
[[ $fingerprint != "$fingerprint1" ]] ||
  fail "the fingerprint did not change with the value ($fingerprint)"

phase="check the broker's log"
! grep -qF -e "$key_v1" -e "$key_v2" "$broker_log" ||
  fail "the broker's log holds a real value"
printf '\n%s==> done.%s The real value reached only the upstream. The broker log (%s lines,\n' \
  "$bold" "$plain" "$(wc -l <"$broker_log")"
printf '    audit records included) holds neither value.\n'
