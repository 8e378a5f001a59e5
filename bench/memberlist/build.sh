#!/usr/bin/env bash
# Build bench/memberlist/build/memberlist-node from Debian packages only: golang-go and
# golang-github-hashicorp-memberlist-dev (its Go dependencies come with it as packages
# and install their sources under /usr/share/gocode/src). GOPATH mode, local toolchain,
# no module downloads. Cached: rebuilds only when main.go is newer than the binary.
# Prints the binary's path on stdout; everything else goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/build/memberlist-node"
packages=(golang-go golang-github-hashicorp-memberlist-dev)

if [[ -x "$out" && "$out" -nt "$here/main.go" ]]; then
    echo "$out"
    exit 0
fi

missing=()
for p in "${packages[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    echo "installing ${missing[*]}" >&2
    # Refresh the package lists only when the install fails (e.g. lists missing or stale).
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
fi

# A temporary GOPATH whose src holds only this program; Debian's sources come second.
gopath="$(mktemp -d)"
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/memberlist-node" "$here/build"
cp "$here/main.go" "$gopath/src/memberlist-node/"

start=$EPOCHREALTIME
(
    cd "$gopath/src/memberlist-node"
    env GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOTOOLCHAIN=local \
        GOFLAGS= GOPROXY=off GOCACHE="$gopath/cache" CGO_ENABLED=0 \
        go build -o "$out.tmp" .
)
mv "$out.tmp" "$out"
printf 'built %s in %.1f s\n' "$out" "$(awk "BEGIN{print $EPOCHREALTIME - $start}")" >&2
echo "$out"
