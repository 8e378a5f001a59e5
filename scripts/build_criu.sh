#!/usr/bin/env bash
# Fetch CRIU's source from Debian (sid), verify it, build `criu` and pycriu, and cache the
# result under $DUNIX_CACHE/criu-<version>/ (default /var/cache/dunix), outside any clone.
#
# Usage: build_criu.sh PYTHON
#   PYTHON is the interpreter `make lib` uses to generate pycriu (the project's venv python).
# On success, $DUNIX_CACHE/criu points at the build in use and the only line printed on
# stdout is its folder: src/criu/criu is the binary, py/ holds the pycriu package.
#
# Why sid: Debian 12's CRIU 3.17 fails `criu check` on kernel 6.18 and Debian 13's 4.1.1
# cannot dump INET sockets on kernels >= 6.16; 4.2 fixed that (see DESIGN.md).
#
# apt runs with a private configuration (its own sources, lists and caches under the cache
# folder): the machine's apt never sees sid, so no binary package can come from it, and the
# machine's own `apt-get update` stays as fast as before. apt still verifies the sid Release
# file against the Debian archive keyring and every file against its hash.
set -euo pipefail

CRIU_MIN_VERSION=4.2.1
# Upstream tarball hashes we have checked by hand; other versions rely on apt's verification.
declare -A CRIU_ORIG_SHA256=(
    [4.2.1]=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
)

# CRIU locks TCP connections during a dump with iptables by default; dunix installs no
# iptables, and this build links libnftables, so make nftables the default for the CLI and
# for RPC requests that leave network_lock unset.
CRIU_MAKE_OPTS="NETWORK_LOCK_DEFAULT=NETWORK_LOCK_NFTABLES"

# Our own patches to CRIU (scripts/criu-patches/*.patch, applied in name order with
# `patch -p1`; each says why at its top). Their hash is part of the build's key and of its
# folder's name (criu-VERSION+dunix.HASH), so a changed patch builds once, beside the build
# in use, and the switch is the $CACHE/criu link.
PATCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/criu-patches
PATCHES=()
if [[ -d $PATCH_DIR ]]; then
    while IFS= read -r f; do PATCHES+=("$f"); done < <(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
fi
PATCH_HASH=""
BUILD_SUFFIX=""
if ((${#PATCHES[@]})); then
    PATCH_HASH=$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)
    BUILD_SUFFIX="+dunix.$PATCH_HASH"
fi
BUILD_KEY="$CRIU_MAKE_OPTS${PATCH_HASH:+ patches=$PATCH_HASH}"

CACHE=${DUNIX_CACHE:-/var/cache/dunix}
LOGS=$CACHE/logs
APTDIR=$CACHE/apt-sid-src
JOBS=$(nproc 2>/dev/null || echo 2)

# Progress goes to stderr: stdout carries only the result folder.
# Progress goes to stderr; stdout carries only the result folder.
say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'build_criu.sh: error: %s\n' "$*" >&2
    exit 1
}
# run_logged NAME CMD...: run CMD with its output in $LOGS/NAME.log; on failure show the tail.
run_logged() {
    local name=$1
    shift
    local log=$LOGS/$name.log
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "$name failed (full log: $log)"
    fi
}

[[ $# -eq 1 ]] || die "usage: build_criu.sh PYTHON"
PYTHON=$1
[[ -x $PYTHON ]] || die "python interpreter '$PYTHON' is not executable"
mkdir -p "$LOGS"

# A finished build is marked by .built holding its build key (options and patches); pick
# the newest cached one >= the minimum that was built with today's key.
newest_cached_build() {
    local best="" d v
    for d in "$CACHE"/criu-*/; do
        [[ -f $d/.built && $(cat "$d/.built") == "$BUILD_KEY" ]] || continue
        v=${d%/}
        v=${v##*/criu-}
        dpkg --compare-versions "$v" ge "$CRIU_MIN_VERSION" || continue
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done
    printf '%s' "$best"
}

# The newest version whose source tarball is already in the cache, pinned version first.
newest_cached_source() {
    local best="" f v
    if [[ -f $CACHE/criu-$CRIU_MIN_VERSION/dl/criu_$CRIU_MIN_VERSION.orig.tar.xz ]]; then
        printf '%s' "$CRIU_MIN_VERSION"
        return
    fi
    for f in "$CACHE"/criu-*/dl/criu_*.orig.tar.xz; do
        [[ -f $f ]] || continue
        v=${f##*/criu_}
        v=${v%.orig.tar.xz}
        dpkg --compare-versions "$v" ge "$CRIU_MIN_VERSION" || continue
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done
    printf '%s' "$best"
}

# The Debian mirror this machine already uses, for the suite named by os-release.
detect_mirror() {
    if [[ -n ${DUNIX_DEBIAN_MIRROR:-} ]]; then
        printf '%s' "$DUNIX_DEBIAN_MIRROR"
        return
    fi
    local codename f uri=""
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n $codename ]] || die "no VERSION_CODENAME in /etc/os-release"
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822: paragraphs separated by blank lines; take URIs of one whose Suites list
        # holds the release codename exactly (not -security or -updates).
        uri=$(awk -v cn="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^#/) continue
                    if (line ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", line); uris = line }
                    else if (line ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", line); suites = line }
                    else if (line ~ /^Enabled:/) { sub(/^Enabled:[ \t]*/, "", line); enabled = line }
                }
                if (enabled == "no" || uris == "") next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == cn) { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "$f")
        [[ -n $uri ]] && break
    done
    if [[ -z $uri ]]; then
        uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' |
            awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }')
    fi
    [[ -n $uri ]] || die "cannot find the Debian mirror for '$codename' in /etc/apt; set DUNIX_DEBIAN_MIRROR"
    printf '%s' "${uri%/}"
}

archive_keyring() {
    local k
    for k in /usr/share/keyrings/debian-archive-keyring.pgp /usr/share/keyrings/debian-archive-keyring.gpg; do
        if [[ -f $k ]]; then
            printf '%s' "$k"
            return
        fi
    done
    die "no Debian archive keyring found (install debian-archive-keyring)"
}

APT_OPTS=()
setup_private_apt() {
    local mirror keyring
    mirror=$(detect_mirror)
    keyring=$(archive_keyring)
    mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial"
    local want
    want=$(printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: %s\n' \
        "$mirror" "$keyring")
    if [[ ! -f $APTDIR/sources.list.d/sid-src.sources ]] ||
        [[ $(cat "$APTDIR/sources.list.d/sid-src.sources") != "$want" ]]; then
        printf '%s\n' "$want" >"$APTDIR/sources.list.d/sid-src.sources"
        rm -f "$APTDIR/lists/"*_Sources* "$APTDIR/lists/"*Release* 2>/dev/null || true
    fi
    APT_OPTS=(
        -o "Dir::Etc::SourceList=/dev/null"
        -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
        -o "Dir::State::Lists=$APTDIR/lists"
        -o "Dir::Cache=$APTDIR/cache"
        -o "Dir::Cache::pkgcache="
        -o "Dir::Cache::srcpkgcache="
    )
}

# Debian versions of criu in the private sid index, newest first.
available_versions() {
    apt-cache "${APT_OPTS[@]}" showsrc criu 2>/dev/null |
        awk '/^Package: /{p=$2} /^Version: /{ if (p == "criu") print $2 }' |
        sort -u | sort -r -V
}

pick_debian_version() {
    local v best="" preferred=""
    while read -r v; do
        [[ -n $v ]] || continue
        local up=${v#*:}
        up=${up%-*}
        dpkg --compare-versions "$up" ge "$CRIU_MIN_VERSION" || continue
        [[ $up == "$CRIU_MIN_VERSION" ]] && preferred=$v
        if [[ -z $best ]] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done < <(available_versions)
    # The version whose hash we checked by hand wins; otherwise the newest.
    printf '%s' "${preferred:-$best}"
}

cached=$(newest_cached_build)
if [[ -n $cached ]]; then
    ln -sfn "criu-$cached" "$CACHE/criu"
    say "CRIU $cached: cached in $CACHE/criu-$cached"
    printf '%s\n' "$CACHE/criu-$cached"
    exit 0
fi

# A source tarball fetched earlier (e.g. before the build options changed) saves apt a trip.
upver=$(newest_cached_source)
if [[ -z $upver ]]; then
    say "CRIU: looking for source >= $CRIU_MIN_VERSION in Debian sid"
    setup_private_apt
    debver=$(pick_debian_version)
    if [[ -z $debver ]]; then
        run_logged apt-sid-src-update apt-get "${APT_OPTS[@]}" update
        debver=$(pick_debian_version)
    fi
    [[ -n $debver ]] || die "Debian sid offers no criu source >= $CRIU_MIN_VERSION"
    upver=${debver#*:}
    upver=${upver%-*}
    say "CRIU: downloading Debian source $debver"
    tmp=$CACHE/criu-$upver/dl.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp" "$CACHE/criu-$upver/dl"
    # apt checks the tarball against the signed sid index; only a complete file is moved in.
    (cd "$tmp" && run_logged "criu-$upver-download" \
        apt-get "${APT_OPTS[@]}" source --download-only --tar-only "criu=$debver")
    [[ -f $tmp/criu_$upver.orig.tar.xz ]] || die "apt-get source did not produce criu_$upver.orig.tar.xz"
    mv "$tmp/criu_$upver.orig.tar.xz" "$CACHE/criu-$upver/dl/"
    rm -rf "$tmp"
fi
orig=$CACHE/criu-$upver/dl/criu_$upver.orig.tar.xz
dir=$CACHE/criu-$upver$BUILD_SUFFIX
if [[ -n ${CRIU_ORIG_SHA256[$upver]:-} ]]; then
    echo "${CRIU_ORIG_SHA256[$upver]}  $orig" | sha256sum --check --quiet - ||
        die "sha256 of $orig does not match the pinned hash; delete $dir and retry"
else
    say "CRIU: no pinned hash for $upver; relying on apt's signature and hash checks"
fi

say "CRIU: unpacking and building (log: $LOGS/criu-$upver-build.log)"
rm -f "$dir/.built"
rm -rf "$dir/src"
mkdir -p "$dir/src"
tar -xJf "$orig" -C "$dir/src" --strip-components=1
for p in "${PATCHES[@]}"; do
    say "CRIU: applying ${p##*/}"
    run_logged "criu-$upver-patch" patch -d "$dir/src" -p1 --batch --forward -i "$p"
done
# Only the upstream tarball is fetched (--tar-only): Debian's patches are packaging tweaks
# that `make criu` does not need, and some mirrors here do not serve the .debian.tar.xz.
build() {
    # shellcheck disable=SC2086  # CRIU_MAKE_OPTS is a list of VAR=value words
    make -C "$dir/src" -j"$JOBS" $CRIU_MAKE_OPTS criu
    make -C "$dir/src" -j"$JOBS" $CRIU_MAKE_OPTS lib PYTHON="$PYTHON"
}
run_logged "criu-$upver-build" build
[[ -x $dir/src/criu/criu ]] || die "build finished but $dir/src/criu/criu is missing"
[[ -f $dir/src/lib/pycriu/__init__.py ]] || die "build finished but pycriu is missing in $dir/src/lib"
# A folder holding only pycriu, for a .pth file (src/lib has other top-level names).
mkdir -p "$dir/py"
ln -sfn ../src/lib/pycriu "$dir/py/pycriu"
printf '%s\n' "$BUILD_KEY" >"$dir/.built"
ln -sfn "criu-$upver$BUILD_SUFFIX" "$CACHE/criu"
say "CRIU $upver$BUILD_SUFFIX: built"
printf '%s\n' "$dir"
