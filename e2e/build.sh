#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager (for its garbage collector), kubectl and etcd from
# Go modules into a cache outside the repository, only those missing there, and prints the folder
# that holds them. Also e2e/metricscheck (Prometheus' own text parser, for /metrics) into that
# folder, named by a hash of its sources (a few seconds; rebuilt only when they change).
#
#   bash e2e/build.sh           # then: ls "$(bash e2e/build.sh)"
#
# E2E_CACHE moves the cache (default ~/.cache/book-controller-e2e). Needs Go and the Go module proxy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
HERE=$PWD

k8s_version=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' apiserver/go.mod)
etcd_version=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" { print $3 }' etcd/go.mod)
cache=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/book-controller-e2e}
bin=$cache/kubernetes-$k8s_version-etcd-$etcd_version
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin # where the official tarball puts it

log() { echo "e2e/build.sh: $*" >&2; }

build() { # build NAME WRAPPER PACKAGES... : copy the wrapper module into the cache and build there
  local name=$1 wrapper=$2 work=$cache/src/$1-$k8s_version-$etcd_version
  shift 2
  rm -rf "$work" && mkdir -p "$work" && cp "$HERE/$wrapper"/* "$work/"
  if [ "$name" = apiserver ]; then
    # k8s.io/kubernetes requires its staging modules (k8s.io/api, ...) as v0.0.0, replaced by
    # ./staging/... in its own repository. Outside it, each is the published k8s.io/xxx v0.N.P.
    local gomod staging
    gomod=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$k8s_version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    staging=v0.${k8s_version#v1.}
    awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { print "replace " $1 " => " $1 " " v }' "$gomod" >>"$work/go.mod"
    log "$(grep -c '^replace' "$work/go.mod") staging modules replaced with their $staging releases"
  fi
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(echo "$k8s_version" | cut -d. -f2)
    -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
  (cd "$work" && go build -trimpath -ldflags "$ldflags" -o "$bin/" "$@")
}

# The Kubernetes commands missing from the cache, built together in one `go build` (their shared
# packages compile once: kube-controller-manager adds a few minutes to a cold build, not another 10).
missing=()
for command in kube-apiserver kube-controller-manager kubectl; do
  [ -x "$bin/$command" ] || missing+=("k8s.io/kubernetes/cmd/$command")
done
if [ -x "$bin/etcd" ] && [ ${#missing[@]} -eq 0 ]; then
  log "using the cached binaries in $bin"
else
  start=$SECONDS
  mkdir -p "$bin"
  log "building Kubernetes $k8s_version and etcd $etcd_version into $bin (the first build takes 10-25 minutes on 2 cores)"
  [ -x "$bin/etcd" ] || build etcd etcd .
  [ ${#missing[@]} -eq 0 ] || build apiserver apiserver "${missing[@]}"
  log "built ${missing[*]##*/}${missing[*]:+ }in $((SECONDS - start))s"
fi

# metricscheck: github.com/prometheus/common/expfmt's text parser behind a small main.go.
checker=$bin/metricscheck-$(cat metricscheck/main.go metricscheck/go.mod | sha256sum | cut -c1-12)
if [ ! -x "$checker" ]; then
  work=$cache/src/metricscheck
  rm -rf "$work" && mkdir -p "$work" "$bin" && cp "$HERE"/metricscheck/* "$work/"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$checker.tmp" . && mv "$checker.tmp" "$checker")
  log "built $checker"
fi
echo "$bin"
