#!/usr/bin/env bash
# Build the test control plane's binaries from Go modules and link them as .tools/bin/<name>.
#
# Invariants:
# - Every version comes from tools/versions.env; the wrapper go.mod files under tools/*/ are
#   checked against it before anything is built, so a pin cannot drift silently.
# - Builds land in a cache outside the clone, keyed by a hash of everything that shapes the
#   binaries (pins, wrapper modules, this script, the Go version), so a fresh clone on the same
#   machine links the cached binaries and builds nothing.
# - A binary enters the cache only whole (built under a temporary name, then renamed), and a
#   lock serialises concurrent builds of the same key.
# - On failure the build log is kept under .artifacts/tools-build/ and its tail is printed.
#
# Environment: PEER_RECOVERY_CACHE overrides the cache root (default ~/.cache/peer-recovery).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/tools"
# shellcheck source=versions.env
source "$TOOLS/versions.env"

export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0

say() { printf '[make tools] %s\n' "$*"; }
die() { printf '[make tools] error: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null || die "go is not on PATH; install Go >= $GO_MIN (https://go.dev/dl/)"
GO_VERSION=$(go env GOVERSION)
if [[ "$(printf '%s\n%s\n' "go$GO_MIN" "$GO_VERSION" | sort -V | head -1)" != "go$GO_MIN" ]]; then
    die "installed $GO_VERSION is older than go$GO_MIN, which the pinned modules require"
fi

# --- the wrapper modules must agree with the pins -------------------------------------------
require_line() { # file module version
    grep -Eq "^[[:space:]]*(require[[:space:]]+)?$2[[:space:]]+$3([[:space:]]|$)" "$TOOLS/$1" ||
        die "tools/$1 does not require $2 $3 as tools/versions.env pins; update one to match the other"
}
require_line kube/go.mod k8s.io/kubernetes "$K8S_VERSION"
require_line etcd/go.mod go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
require_line helm/go.mod helm.sh/helm/v3 "$HELM_VERSION"
require_line kwok/go.mod sigs.k8s.io/kwok "$KWOK_VERSION"
require_line training-operator/go.mod github.com/kubeflow/training-operator "$TRAINING_OPERATOR_VERSION"
bad_staging=$(grep -E '^replace k8s\.io/' "$TOOLS/kube/go.mod" | grep -v "=> .* $K8S_STAGING_VERSION\$" || true)
[[ -z "$bad_staging" ]] || die "tools/kube/go.mod replaces a staging module with a version other than $K8S_STAGING_VERSION: $bad_staging"
[[ "$K8S_STAGING_VERSION" == "v0.${K8S_VERSION#v1.}" ]] ||
    die "K8S_STAGING_VERSION=$K8S_STAGING_VERSION does not match K8S_VERSION=$K8S_VERSION (expected v0.${K8S_VERSION#v1.})"

# --- cache key -------------------------------------------------------------------------------
KEY=$(
    {
        echo "$GO_VERSION $(go env GOOS GOARCH)"
        cat "$TOOLS/versions.env" "$TOOLS/build.sh"
        for f in "$TOOLS"/*/go.mod "$TOOLS"/*/go.sum "$TOOLS"/*/*.go; do echo "== ${f#"$TOOLS"/}"; cat "$f"; done
    } | sha256sum | cut -c1-16
)
CACHE_ROOT=${PEER_RECOVERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/peer-recovery}
CACHE="$CACHE_ROOT/$KEY"
BIN="$CACHE/bin"
LINK_DIR="$ROOT/.tools/bin"
NAMES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm kwok training-operator)

link_all() {
    mkdir -p "$LINK_DIR"
    for name in "${NAMES[@]}"; do ln -sfn "$BIN/$name" "$LINK_DIR/$name"; done
    ln -sfn "$CACHE" "$ROOT/.tools/current"
}

if [[ -f "$CACHE/.complete" ]]; then
    link_all
    say "up to date: $CACHE (linked into .tools/bin)"
    exit 0
fi

mkdir -p "$BIN"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "another build of $KEY is running; waiting for it"
    flock 9
fi

LOG_DIR="$CACHE/logs"
mkdir -p "$LOG_DIR"
K8S_MINOR=${K8S_VERSION#v1.}
K8S_MINOR=${K8S_MINOR%%.*}

kube_ldflags() {
    local flags="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$K8S_MINOR"
        flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    echo "$flags"
}

helm_ldflags() {
    local flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    # The Kubernetes version `helm template` assumes when no cluster is asked.
    for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        flags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$K8S_MINOR"
    done
    echo "$flags"
}

# build <step> <output> <module dir> <package> <ldflags> [extra go build args...]
build() {
    local step=$1 out=$2 dir=$3 pkg=$4 ldflags=$5
    shift 5
    if [[ -x "$BIN/$out" ]]; then
        say "$step $out: cached"
        return
    fi
    local log="$LOG_DIR/$out.log" start=$SECONDS
    say "$step $out: building $pkg (log: $log)"
    if ! (cd "$TOOLS/$dir" && go build -trimpath "$@" -ldflags "$ldflags" -o "$BIN/.$out.tmp" "$pkg") >"$log" 2>&1; then
        mkdir -p "$ROOT/.artifacts/tools-build"
        cp "$log" "$ROOT/.artifacts/tools-build/$out.log"
        tail -n 40 "$log" >&2
        die "building $out failed; full log kept at .artifacts/tools-build/$out.log and $log"
    fi
    mv -f "$BIN/.$out.tmp" "$BIN/$out"
    say "$step $out: done in $((SECONDS - start))s"
}

# The training-operator's own manifests at the pinned version, from the Go module cache, so the
# control plane installs exactly the CRD, webhook configuration and ClusterRole that match the
# binary.
copy_training_operator_manifests() {
    local dir
    dir=$(cd "$TOOLS/training-operator" && go list -m -f '{{.Dir}}' github.com/kubeflow/training-operator) ||
        die "cannot locate github.com/kubeflow/training-operator $TRAINING_OPERATOR_VERSION in the Go module cache"
    mkdir -p "$CACHE/manifests/training-operator"
    cp "$dir/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$dir/manifests/base/webhook/manifests.yaml" \
        "$dir/manifests/base/rbac/role.yaml" "$CACHE/manifests/training-operator/"
    chmod u+w "$CACHE/manifests/training-operator/"*
}

say "building into $CACHE (k8s $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, kwok $KWOK_VERSION, training-operator $TRAINING_OPERATOR_VERSION, $GO_VERSION)"
total=$SECONDS
build "[1/5]" etcd etcd go.etcd.io/etcd/server/v3 \
    "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION"
build "[2/5]" kube kube . "$(kube_ldflags)" -tags=providerless,notest
for name in kube-apiserver kube-controller-manager kube-scheduler kubectl; do ln -sfn kube "$BIN/$name"; done
build "[3/5]" kwok kwok sigs.k8s.io/kwok/cmd/kwok "-s -w"
build "[4/5]" helm helm helm.sh/helm/v3/cmd/helm "$(helm_ldflags)"
# Our own main (tools/training-operator/main.go) over the pinned module's packages, so its
# webhook server can listen on loopback only; upstream's cmd/training-operator.v1 binds it to
# every interface.
build "[5/5]" training-operator training-operator . "-s -w"
copy_training_operator_manifests

"$BIN/kubectl" version --client >/dev/null || die "the built kubectl does not run"
cp "$TOOLS/versions.env" "$CACHE/versions.env"
touch "$CACHE/.complete"
link_all
say "done in $((SECONDS - total))s: $(cd "$BIN" && echo "${NAMES[*]}") in $BIN, linked into .tools/bin"
