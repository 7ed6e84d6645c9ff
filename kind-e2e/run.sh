#!/usr/bin/env bash
# credbroker end to end on a real cluster (kind), for users and hosted CI
# with Docker and the internet. See kind-e2e/README.md.
#
#   1. a kind cluster; the four images built from images/Dockerfile and
#      loaded into it;
#   2. OpenBao (dev mode, from its public Helm chart) serving TLS with a CA
#      made here, with Kubernetes auth, the KV v2 mount `secret`, and the
#      controller's own policy and role;
#   3. credbroker from charts/credbroker;
#   4. an HTTPS upstream (its own CA), a ClusterCredentialPolicy, a
#      CredentialBinding and an injected curl agent;
#   5. the journey (the real secret reaches the upstream, the agent holds
#      only the placeholder, a rotation lands within refreshInterval + 1 s
#      with no failed request) and the attacks (no broker token, no
#      service-account token, a placeholder sent elsewhere stays a
#      placeholder, no secret in Kubernetes objects or broker logs).
#
# Idempotent: with KEEP_CLUSTER=1 a second run reuses the cluster and
# converges it again. Without it the cluster is deleted on exit, whatever
# the outcome. On failure it prints diagnostics first.
#
# Written where no Docker engine or internet was available: it has not been
# run there. CI (.github/workflows/kind-e2e.yaml) runs it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

CLUSTER_NAME="${CLUSTER_NAME:-credbroker-e2e}"
K8S_VERSION="${K8S_VERSION:-v1.36.1}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:${K8S_VERSION}}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
IMAGE_PREFIX="${IMAGE_PREFIX:-credbroker}"
IMAGE_TAG="${IMAGE_TAG:-e2e}"
OPENBAO_CHART_VERSION="${OPENBAO_CHART_VERSION:-0.29.2}"
AGENT_IMAGE="${AGENT_IMAGE:-curlimages/curl:8.11.1}"
UPSTREAM_IMAGE="${UPSTREAM_IMAGE:-python:3.13-alpine}"
# Short, so the rotation check is quick; the bound is this plus 1 s.
REFRESH_SECONDS="${REFRESH_SECONDS:-2}"
# How long the request loop runs across the rotation.
ROTATION_WINDOW_SECONDS="${ROTATION_WINDOW_SECONDS:-12}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-300s}"
# The audience of the controller's projected Vault token (the chart's
# vault.controllerAudience); its Vault role requires it.
CONTROLLER_AUDIENCE="${CONTROLLER_AUDIENCE:-vault}"
WORK="${WORK_DIR:-$HERE/.work/$CLUSTER_NAME}"

CONTEXT="kind-$CLUSTER_NAME"
BROKER_NS=credbroker-system
BAO_NS=openbao
BAO_POD=openbao-0
BAO_ADDR_IN_CLUSTER="https://openbao.$BAO_NS.svc:8200"
CLUSTER_ID=kind-e2e
CONTROLLER_ROLE=credbroker-controller
CONTROLLER_SA=credbroker-controller
SECRET_PATH=e2e/echo
ECHO_URL=https://echo.upstream.svc.cluster.local/v1/check
OTHER_URL=https://other.upstream.svc.cluster.local/v1/elsewhere

STEP="setup"

log() { printf '\n==> [%s] %s\n' "$STEP" "$*" >&2; }
ok() { printf '    ok: %s\n' "$*" >&2; }
fail() {
  printf '\nkind-e2e: FAILED in step "%s": %s\n' "$STEP" "$*" >&2
  exit 1
}
need() {
  command -v "$1" > /dev/null 2>&1 || fail "$1 is required (see kind-e2e/README.md)"
}

# Every kubectl and helm call names the kind context: the user's current
# context is never touched.
k() { kubectl --context "$CONTEXT" "$@"; }
h() { helm --kube-context "$CONTEXT" "$@"; }

# bao inside the OpenBao pod, over its TLS listener (BAO_ADDR and
# BAO_CACERT come from the pod's environment), as the dev root token.
# bao_stdin forwards this script's stdin (for `bao policy write NAME -`).
bao() { k -n "$BAO_NS" exec "$BAO_POD" -c openbao -- env BAO_TOKEN=root bao "$@"; }
bao_stdin() { k -n "$BAO_NS" exec -i "$BAO_POD" -c openbao -- env BAO_TOKEN=root bao "$@"; }

# Pipelines never end in `grep -q`, `head` or an early `exit`: under
# pipefail the writer's SIGPIPE would fail the pipeline whatever grep
# found. Output is captured first, then searched.
has() { grep -qF -- "$2" <<< "$1"; }
cluster_exists() {
  local clusters
  clusters="$(kind get clusters 2> /dev/null || true)"
  grep -qx -- "$CLUSTER_NAME" <<< "$clusters"
}
# The echo upstream's log (one JSON line per request) into $WORK/upstream.log.
upstream_log() { k -n upstream logs deployment/echo > "$WORK/upstream.log"; }
# upstream_lines PATH: the log lines of requests for PATH.
upstream_lines() { grep -F "\"path\": \"$1\"" "$WORK/upstream.log" || true; }

sha256_hex() { printf '%s' "$1" | openssl dgst -sha256 | awk '{print $NF}'; }

# Runs curl in the agent container with the placeholder in the header; the
# variable is expanded inside the container, so its value never passes
# through this script's command line.
agent_curl() {
  local url="$1"
  shift
  # shellcheck disable=SC2016 # expanded by the agent's shell, on purpose
  k -n agents exec agent -c agent -- sh -c \
    'url="$1"; shift; exec curl -sS --fail-with-body --max-time 10 "$@" -H "Authorization: Bearer $ECHO_API_KEY" "$url"' \
    sh "$url" "$@"
}

# The hash the upstream answered with.
answered_hash() { sed -n 's/.*"authorization_sha256": *"\([0-9a-f]*\)".*/\1/p'; }

diagnostics() {
  set +e
  echo
  echo "================ kind-e2e diagnostics (step: $STEP) ================"
  if ! cluster_exists; then
    echo "(no cluster $CLUSTER_NAME)"
    return
  fi
  # The upstream's log and these objects hold the throwaway test secrets
  # of this run, nothing else.
  k get nodes -o wide
  k get pods -A -o wide
  k get credentialbindings,clustercredentialpolicies -A -o yaml
  k get events -A --sort-by=.lastTimestamp | tail -n 80
  local ns pod
  for ns in "$BROKER_NS" agents upstream "$BAO_NS"; do
    echo "---------------- namespace $ns ----------------"
    k -n "$ns" describe pods
    for pod in $(k -n "$ns" get pods -o name 2> /dev/null); do
      echo "---------------- logs $ns/$pod ----------------"
      k -n "$ns" logs "$pod" --all-containers --prefix --tail=300
      k -n "$ns" logs "$pod" --all-containers --prefix --previous --tail=100 2> /dev/null
    done
  done
  k -n agents get configmaps -o yaml
  echo "================ end of diagnostics ================"
}

finish() {
  local rc=$?
  set +e
  if [ "$rc" -ne 0 ]; then
    diagnostics >&2
    echo "kind-e2e: FAILED (exit $rc) in step \"$STEP\"" >&2
  fi
  if [ "$KEEP_CLUSTER" = 1 ]; then
    echo "kind-e2e: keeping cluster $CLUSTER_NAME (context $CONTEXT); delete it with: kind delete cluster --name $CLUSTER_NAME" >&2
  else
    kind delete cluster --name "$CLUSTER_NAME" > /dev/null 2>&1
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap finish EXIT

for tool in docker kind kubectl helm openssl awk sed grep; do need "$tool"; done
mkdir -p "$WORK"

# ---------------------------------------------------------------------------
STEP="1 cluster and images"
if cluster_exists; then
  log "reusing kind cluster $CLUSTER_NAME"
  kind export kubeconfig --name "$CLUSTER_NAME" > /dev/null
else
  log "creating kind cluster $CLUSTER_NAME ($KIND_NODE_IMAGE)"
  kind create cluster --name "$CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --wait 180s
fi
k get nodes

if [ "$SKIP_BUILD" = 1 ]; then
  log "SKIP_BUILD=1: using the images already in Docker"
fi
# BuildKit is required (cache mounts, COPY --chmod). `docker buildx build
# --load` puts the image into Docker's store whichever builder is current.
if docker buildx version > /dev/null 2>&1; then
  build() { docker buildx build --load "$@"; }
else
  build() { DOCKER_BUILDKIT=1 docker build "$@"; }
fi
for target in sidecar init controller webhook; do
  image="$IMAGE_PREFIX/$target:$IMAGE_TAG"
  if [ "$SKIP_BUILD" != 1 ]; then
    log "building $image (images/Dockerfile, target $target)"
    build -f "$ROOT/images/Dockerfile" --target "$target" -t "$image" \
      --build-arg REVISION="$(git -C "$ROOT" rev-parse HEAD 2> /dev/null || echo unknown)" "$ROOT"
  fi
  kind load docker-image "$image" --name "$CLUSTER_NAME"
done
ok "four images loaded"

# ---------------------------------------------------------------------------
STEP="2 OpenBao with TLS"
# Two throwaway CAs: one for OpenBao, one for the echo upstream. Kept in
# $WORK so a rerun against a kept cluster uses the same ones.
make_ca() {
  local dir="$1" cn="$2"
  mkdir -p "$dir"
  [ -s "$dir/ca.crt" ] && return 0
  cat > "$dir/ca.cnf" << EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $cn
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 7 \
    -config "$dir/ca.cnf" -extensions v3_ca \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2> /dev/null
}
# make_leaf DIR CN SAN...: a serving certificate signed by DIR's CA.
make_leaf() {
  local dir="$1" cn="$2"
  shift 2
  [ -s "$dir/tls.crt" ] && return 0
  local sans
  sans="$(printf '%s,' "$@")"
  cat > "$dir/leaf.ext" << EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${sans%,}
EOF
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$dir/tls.key" -out "$dir/tls.csr" 2> /dev/null
  openssl x509 -req -sha256 -days 7 -in "$dir/tls.csr" \
    -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -extfile "$dir/leaf.ext" -out "$dir/tls.crt" 2> /dev/null
  openssl verify -CAfile "$dir/ca.crt" "$dir/tls.crt" > /dev/null
}
make_ca "$WORK/openbao" "credbroker kind-e2e OpenBao CA"
make_leaf "$WORK/openbao" "openbao.$BAO_NS.svc" \
  DNS:openbao DNS:openbao.$BAO_NS DNS:openbao.$BAO_NS.svc DNS:openbao.$BAO_NS.svc.cluster.local \
  DNS:localhost IP:127.0.0.1 IP:::1
make_ca "$WORK/upstream" "credbroker kind-e2e upstream CA"
make_leaf "$WORK/upstream" "echo.upstream.svc.cluster.local" \
  DNS:echo.upstream.svc.cluster.local DNS:echo.upstream.svc DNS:other.upstream.svc.cluster.local DNS:other.upstream.svc
ok "CAs and certificates in $WORK"

# The chart's dev mode runs `bao server -dev <server.extraArgs>`. Dev mode
# merges -config files into its own configuration, so the listener below
# (TLS, our certificate) serves port 8200, and the dev listener itself
# moves to cleartext loopback 127.0.0.1:8210 (the chart would otherwise
# put it on [::]:8200). Nothing outside the pod can reach the cleartext one.
cat > "$WORK/openbao/listener.hcl" << 'EOF'
listener "tcp" {
  address       = "[::]:8200"
  tls_cert_file = "/openbao/userconfig/openbao-tls/tls.crt"
  tls_key_file  = "/openbao/userconfig/openbao-tls/tls.key"
}
EOF
cat > "$WORK/openbao/values.yaml" << 'EOF'
global:
  # https in the chart's BAO_ADDR, probes and Service port name.
  tlsDisable: false
injector:
  enabled: false
server:
  dev:
    enabled: true
    devRootToken: root
  extraArgs: "-dev-listen-address=127.0.0.1:8210 -config=/openbao/userconfig/openbao-tls/listener.hcl"
  extraEnvironmentVars:
    # `bao` in the pod (the chart sets BAO_ADDR=https://127.0.0.1:8200)
    # verifies the listener against our CA.
    BAO_CACERT: /openbao/userconfig/openbao-tls/ca.crt
  # Mounted at /openbao/userconfig/openbao-tls.
  extraVolumes:
    - type: secret
      name: openbao-tls
EOF
k create namespace "$BAO_NS" --dry-run=client -o yaml | k apply -f -
applied="$(k -n "$BAO_NS" create secret generic openbao-tls \
  --from-file=tls.crt="$WORK/openbao/tls.crt" --from-file=tls.key="$WORK/openbao/tls.key" \
  --from-file=ca.crt="$WORK/openbao/ca.crt" --from-file=listener.hcl="$WORK/openbao/listener.hcl" \
  --dry-run=client -o yaml | k apply -f -)"
helm repo add openbao https://openbao.github.io/openbao-helm --force-update > /dev/null
helm repo update openbao > /dev/null
log "installing OpenBao (chart openbao/openbao $OPENBAO_CHART_VERSION, dev mode, TLS)"
h upgrade --install openbao openbao/openbao --version "$OPENBAO_CHART_VERSION" \
  -n "$BAO_NS" -f "$WORK/openbao/values.yaml" --wait --timeout "$WAIT_TIMEOUT"
# OpenBao reads its certificate at start: a kept cluster whose Secret just
# changed (new keys in a fresh $WORK) needs a new pod. Dev mode keeps
# nothing across it, and everything below is written again anyway.
if has "$applied" configured; then
  k -n "$BAO_NS" delete pod "$BAO_POD" --wait=true
  for _ in $(seq 1 60); do
    k -n "$BAO_NS" get pod "$BAO_POD" > /dev/null 2>&1 && break
    sleep 1
  done
fi
k -n "$BAO_NS" wait --for=condition=Ready "pod/$BAO_POD" --timeout="$WAIT_TIMEOUT"
bao status > /dev/null || fail "bao status over TLS (127.0.0.1) failed"
# The name the broker uses, verified against our CA from inside the cluster.
bao status -address="$BAO_ADDR_IN_CLUSTER" > /dev/null ||
  fail "OpenBao's certificate does not verify for $BAO_ADDR_IN_CLUSTER"
ok "OpenBao serves TLS at $BAO_ADDR_IN_CLUSTER, verified against the generated CA"

# Kubernetes auth, in-cluster: OpenBao reviews tokens with its own
# ServiceAccount, which the chart binds to system:auth-delegator
# (server.authDelegator), and the pod's own CA file for the API server.
has "$(bao auth list -format=json)" '"kubernetes/"' || bao auth enable kubernetes
bao write auth/kubernetes/config kubernetes_host=https://kubernetes.default.svc > /dev/null
# Dev mode mounts KV v2 at secret/ already; a rerun finds it too.
has "$(bao secrets list -format=json)" '"secret/"' || bao secrets enable -path=secret -version=2 kv
ok "Kubernetes auth and KV v2 at secret/"

# The controller's own policy: exactly what it prints (docs/controller.md).
docker run --rm "$IMAGE_PREFIX/controller:$IMAGE_TAG" --print-vault-policy \
  --cluster-id "$CLUSTER_ID" --kubernetes-auth-mount kubernetes --kv-mount secret \
  > "$WORK/controller-policy.json"
grep -q '"path"' "$WORK/controller-policy.json" || fail "credbroker-controller --print-vault-policy printed no policy"
bao_stdin policy write credbroker-controller - < "$WORK/controller-policy.json" > /dev/null
ok "policy credbroker-controller written (from --print-vault-policy)"

# ---------------------------------------------------------------------------
STEP="3 credbroker chart"
cat > "$WORK/credbroker-values.yaml" << EOF
clusterId: $CLUSTER_ID
vault:
  address: $BAO_ADDR_IN_CLUSTER
  authMount: kubernetes
  controllerRole: $CONTROLLER_ROLE
  controllerAudience: $CONTROLLER_AUDIENCE
images:
  pullPolicy: Never
  sidecar: { repository: $IMAGE_PREFIX/sidecar, tag: "$IMAGE_TAG" }
  init: { repository: $IMAGE_PREFIX/init, tag: "$IMAGE_TAG" }
  controller: { repository: $IMAGE_PREFIX/controller, tag: "$IMAGE_TAG" }
  webhook: { repository: $IMAGE_PREFIX/webhook, tag: "$IMAGE_TAG" }
EOF
chart_args=(-n "$BROKER_NS" -f "$WORK/credbroker-values.yaml" --set-file "vault.caBundle=$WORK/openbao/ca.crt")

# The controller logs in with a projected token of audience
# vault.controllerAudience; its role requires exactly that audience (checked
# on the live Deployment below).
bao write "auth/kubernetes/role/$CONTROLLER_ROLE" \
  bound_service_account_names="$CONTROLLER_SA" \
  bound_service_account_namespaces="$BROKER_NS" \
  audience="$CONTROLLER_AUDIENCE" \
  token_policies=credbroker-controller token_no_default_policy=true \
  token_ttl=1h token_max_ttl=4h > /dev/null
ok "role $CONTROLLER_ROLE for $BROKER_NS/$CONTROLLER_SA, audience $CONTROLLER_AUDIENCE"

reinstall=0
h status credbroker -n "$BROKER_NS" > /dev/null 2>&1 && reinstall=1
log "installing charts/credbroker"
h upgrade --install credbroker "$ROOT/charts/credbroker" "${chart_args[@]}" \
  --create-namespace --wait --timeout "$WAIT_TIMEOUT"
if [ "$reinstall" = 1 ]; then
  # Same tags, new images: restart so the pods run what was just loaded.
  for d in $(k -n "$BROKER_NS" get deployments -o name); do
    k -n "$BROKER_NS" rollout restart "$d"
    k -n "$BROKER_NS" rollout status "$d" --timeout="$WAIT_TIMEOUT"
  done
fi
live_audiences="$(k -n "$BROKER_NS" get deployments -o jsonpath='{..serviceAccountToken.audience}')"
case " $live_audiences " in
  *" $CONTROLLER_AUDIENCE "*) ;;
  *) fail "the controller's Vault role requires audience $CONTROLLER_AUDIENCE, the Deployments project: $live_audiences" ;;
esac
k wait --for=condition=Established crd/credentialbindings.credbroker.dev crd/clustercredentialpolicies.credbroker.dev --timeout=60s
ok "credbroker installed in $BROKER_NS"

# ---------------------------------------------------------------------------
STEP="4 upstream, policy, binding, agent"
k apply -f <(sed "s|UPSTREAM_IMAGE|$UPSTREAM_IMAGE|" "$HERE/manifests/upstream.yaml")
applied="$(k -n upstream create secret tls echo-tls --cert="$WORK/upstream/tls.crt" --key="$WORK/upstream/tls.key" \
  --dry-run=client -o yaml | k apply -f -)"
# The upstream too reads its certificate once, at start.
has "$applied" configured && k -n upstream rollout restart deployment/echo
k -n upstream rollout status deployment/echo --timeout="$WAIT_TIMEOUT"

SECRET1="sk-e2e-first-$(openssl rand -hex 16)"
SECRET2="sk-e2e-rotated-$(openssl rand -hex 16)"
bao kv put "secret/$SECRET_PATH" api_key="$SECRET1" > /dev/null
ok "secret/$SECRET_PATH written to OpenBao"

# On a rerun, start the tenant side afresh: the binding's status then
# describes this run's secret, and the pod gets this run's placeholder.
if k get namespace agents > /dev/null 2>&1; then
  k -n agents delete pod agent --ignore-not-found --wait=true
  k -n agents delete credentialbinding echo --ignore-not-found --wait=true --timeout="$WAIT_TIMEOUT"
fi
k apply -f <(sed "s|REFRESH_INTERVAL|${REFRESH_SECONDS}s|" "$HERE/manifests/agents.yaml")
k -n agents create configmap upstream-ca --from-file=ca.crt="$WORK/upstream/ca.crt" \
  --dry-run=client -o yaml | k apply -f -

k -n agents wait --for=condition=Ready credentialbinding/echo --timeout="$WAIT_TIMEOUT"
metadata="$(bao kv metadata get -format=json "secret/$SECRET_PATH")"
vault_version="$(sed -n 's/.*"current_version": *\([0-9][0-9]*\).*/\1/p' <<< "$metadata")"
[ -n "$vault_version" ] || fail "no current_version in OpenBao's metadata for secret/$SECRET_PATH"
status_version=""
for _ in $(seq 1 30); do
  status_version="$(k -n agents get credentialbinding echo -o jsonpath='{.status.secretVersion}')"
  [ "$status_version" = "$vault_version" ] && break
  sleep 1
done
[ "$status_version" = "$vault_version" ] ||
  fail "status.secretVersion is '$status_version', Vault's current_version is '$vault_version'"
ok "binding echo Ready, status.secretVersion $status_version = Vault's current_version"

k apply -f <(sed "s|AGENT_IMAGE|$AGENT_IMAGE|" "$HERE/manifests/agent-pod.yaml")
k -n agents wait --for=condition=Ready pod/agent --timeout="$WAIT_TIMEOUT"
init_names="$(k -n agents get pod agent -o jsonpath='{.spec.initContainers[*].name}')"
case "$init_names" in
  "credbroker-init credbroker-sidecar"*) ;;
  *) fail "the agent pod was not injected (init containers: '$init_names')" ;;
esac
ok "agent injected: $init_names"

# ---------------------------------------------------------------------------
STEP="5a the agent holds only the placeholder"
placeholder="$(k -n agents exec agent -c agent -- printenv ECHO_API_KEY)"
[ -n "$placeholder" ] || fail "ECHO_API_KEY is not set in the agent"
[ "$placeholder" != "$SECRET1" ] || fail "the agent's ECHO_API_KEY is the real secret"
case "$placeholder" in sk-*) ;; *) fail "the placeholder does not carry the binding's prefix sk-" ;; esac
annotation="$(k -n agents get pod agent -o jsonpath='{.metadata.annotations.credbroker\.dev/placeholders}')"
has "$annotation" "\"$placeholder\"" ||
  fail "the placeholder is not the one in the pod's credbroker.dev/placeholders annotation ($annotation)"
agent_env="$(k -n agents exec agent -c agent -- env)"
if has "$agent_env" "$SECRET1"; then
  fail "the real secret is in the agent's environment"
fi
ok "agent env: ECHO_API_KEY is the pod's placeholder, the secret is nowhere in env"

STEP="5b the request reaches the upstream with the real secret"
answer="$(agent_curl "$ECHO_URL")" || fail "the agent's request to $ECHO_URL failed: $answer"
got="$(printf '%s' "$answer" | answered_hash)"
[ "$got" = "$(sha256_hex "Bearer $SECRET1")" ] ||
  fail "the upstream received something else than 'Bearer <secret>' (answer: $answer; placeholder hash would be $(sha256_hex "Bearer $placeholder"))"
upstream_log
has "$(upstream_lines /v1/check)" "Bearer $SECRET1" || fail "the upstream's log does not show the real secret"
ok "upstream received Bearer <real secret>; the agent sent only the placeholder"

STEP="5c rotation"
codes="$WORK/rotation-codes.txt"
: > "$codes"
# Requests one after another across the write, from inside the agent.
# shellcheck disable=SC2016 # expanded by the agent's shell, on purpose
k -n agents exec agent -c agent -- sh -c '
  end=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    curl -sS -o /dev/null -w "%{http_code}\n" --max-time 5 \
      -H "Authorization: Bearer $ECHO_API_KEY" https://echo.upstream.svc.cluster.local/v1/rotate || echo curl-failed
    sleep 0.2
  done' sh "$ROTATION_WINDOW_SECONDS" > "$codes" 2>&1 &
loop_pid=$!
sleep 3
put_out="$(bao kv put -format=json "secret/$SECRET_PATH" api_key="$SECRET2")"
# When the write happened: the new version's created_time, by OpenBao's
# clock. OpenBao, the sidecar and the upstream run on the one kind node, so
# they read the same kernel clock; the upstream pod's python turns the
# RFC 3339 time into the Unix time its log lines carry.
created="$(awk -F'"' '/"created_time"/ { print $4; exit }' <<< "$put_out")"
[ -n "$created" ] || fail "bao kv put printed no created_time"
t_write="$(k -n upstream exec deployment/echo -- python3 -c '
import datetime, sys
base, _, frac = sys.argv[1].rstrip("Z").partition(".")
t = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
t = t.timestamp() + float("0." + (frac or "0"))
print("%.3f" % t)' "$created")"
wait "$loop_pid" || fail "the request loop in the agent failed: $(tail -n 5 "$codes")"
total="$(wc -l < "$codes" | tr -d ' ')"
bad="$(grep -cvx 200 "$codes" || true)"
[ "$total" -ge 10 ] || fail "only $total requests ran across the rotation"
[ "$bad" -eq 0 ] || fail "$bad of $total requests failed across the rotation: $(sort "$codes" | uniq -c | tr '\n' ' ')"
new_hash="$(sha256_hex "Bearer $SECRET2")"
old_hash="$(sha256_hex "Bearer $SECRET1")"
upstream_log
upstream_lines /v1/rotate > "$WORK/rotation-log.jsonl"
# The "t" of the first request that carried the new value.
t_first_new="$(awk -v h="\"sha256\": \"$new_hash\"" '
  index($0, h) { v = $0; sub(/^\{"t": /, "", v); sub(/,.*/, "", v); print v; exit }' "$WORK/rotation-log.jsonl")"
[ -n "$t_first_new" ] || fail "no request carried the rotated secret within ${ROTATION_WINDOW_SECONDS}s"
delay="$(awk -v a="$t_write" -v b="$t_first_new" 'BEGIN { printf "%.3f", b - a }')"
awk -v d="$delay" -v limit="$((REFRESH_SECONDS + 1))" 'BEGIN { exit !(d <= limit) }' ||
  fail "the rotated secret was first used ${delay}s after the write; the bound is refreshInterval + 1s = $((REFRESH_SECONDS + 1))s"
late_old="$(awk -v t="$t_first_new" -v h="\"sha256\": \"$old_hash\"" '
  index($0, h) { v = $0; sub(/^\{"t": /, "", v); sub(/,.*/, "", v); if (v + 0 > t + 0) n++ }
  END { print n + 0 }' "$WORK/rotation-log.jsonl")"
[ "$late_old" -eq 0 ] || fail "$late_old requests carried the old secret after the new one was in use"
ok "rotation: new value in use ${delay}s after the write (bound $((REFRESH_SECONDS + 1))s), $total requests, none failed"

# ---------------------------------------------------------------------------
STEP="5d attacks"
if k -n agents exec agent -c agent -- cat /var/run/secrets/credbroker/token > /dev/null 2>&1; then
  fail "the agent can read the broker token /var/run/secrets/credbroker/token"
fi
ok "the broker token is not in the agent container"
if k -n agents exec agent -c agent -- cat /var/run/secrets/kubernetes.io/serviceaccount/token > /dev/null 2>&1; then
  fail "the agent has a service-account token at the default path"
fi
ok "no service-account token at /var/run/secrets/kubernetes.io/serviceaccount"

# TLS to a host no binding names is not intercepted: verified against the
# upstream CA directly, and the placeholder arrives as it was sent.
answer="$(agent_curl "$OTHER_URL" --cacert /etc/upstream-ca/ca.crt)" ||
  fail "the agent's request to $OTHER_URL failed: $answer"
got="$(printf '%s' "$answer" | answered_hash)"
[ "$got" = "$(sha256_hex "Bearer $placeholder")" ] ||
  fail "the unbound host did not receive the placeholder unchanged (answer: $answer)"
upstream_log
other_log="$(upstream_lines /v1/elsewhere)"
has "$other_log" "Bearer $placeholder" || fail "the upstream log does not show the placeholder for $OTHER_URL"
if has "$other_log" "$SECRET1" || has "$other_log" "$SECRET2"; then
  fail "a real secret reached a host no binding names"
fi
ok "the placeholder sent to other.upstream arrived unchanged, no secret there"

# Invariant 1: no real value in Kubernetes objects or the broker's logs.
{
  k -n agents get pods,configmaps,credentialbindings -o yaml
  k -n agents logs agent --all-containers
  for pod in $(k -n "$BROKER_NS" get pods -o name); do k -n "$BROKER_NS" logs "$pod" --all-containers; done
} > "$WORK/leak-scan.txt" 2>&1
if grep -qF -e "$SECRET1" -e "$SECRET2" "$WORK/leak-scan.txt"; then
  fail "a real secret appears in the agents' objects or in the broker's logs (see $WORK/leak-scan.txt)"
fi
ok "no real secret in the agents' pods, ConfigMaps, bindings, or the broker's logs"

STEP="done"
printf '\nkind-e2e: PASSED on %s (%s)\n' "$CLUSTER_NAME" "$KIND_NODE_IMAGE" >&2
