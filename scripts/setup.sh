#!/usr/bin/env bash
# One-command install for dunix on Debian 12 or 13, as root:
#   system packages, CRIU (built from Debian's sid source, cached), the project venv with
#   pycriu and criu in it, the pipe size post-copy needs, and the native helpers.
# Idempotent: a second run only checks and takes seconds. Long steps log to
# $DUNIX_CACHE/logs (default /var/cache/dunix/logs).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DUNIX_CACHE=${DUNIX_CACHE:-/var/cache/dunix}
CACHE=$DUNIX_CACHE
LOGS=$CACHE/logs
VENV=$REPO/.venv
PIPE_MAX_SIZE_MIN=$((4 * 1024 * 1024))

# System packages: build tools, python, network and mount tools, CRIU's build deps, FUSE.
PACKAGES=(
    gcc make pkg-config libc6-dev xz-utils debian-archive-keyring patch
    python3
    iproute2 util-linux nftables busybox-static
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler python3-protobuf
    libnl-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev libgnutls28-dev libnftables-dev
    libdrm-dev
    libfuse3-dev fuse3
    libssl-dev
    fio iperf3
)

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'setup.sh: error: %s\n' "$*" >&2
    exit 1
}
run_logged() {
    local name=$1
    shift
    local log=$LOGS/$name.log
    if ! "$@" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "$name failed (full log: $log)"
    fi
}

[[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and sets a sysctl)"
[[ -r /etc/os-release ]] || die "no /etc/os-release: not a Debian system"
# shellcheck disable=SC1091
os_id=$(. /etc/os-release && printf '%s %s' "${ID:-}" "${ID_LIKE:-}")
[[ " $os_id " == *" debian "* ]] || die "unsupported system '$os_id': dunix setup needs Debian 12 or 13"

mkdir -p "$LOGS"
# Serialize concurrent runs (several checkouts may run `make test` at once).
exec 9>"$CACHE/setup.lock"
if ! flock -n 9; then
    say "another setup is running; waiting for it"
    flock -w 3600 9 || die "timed out waiting for $CACHE/setup.lock"
fi

start=$SECONDS

# --- 1. system packages -------------------------------------------------------------------
is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == "ii"* ]]
}

# The interpreter for a new venv; Debian's python3 needs python3-venv (ensurepip) and
# python3-dev (headers for packages without wheels, e.g. pyfuse3).
BASE_PYTHON=${DUNIX_PYTHON:-$(command -v python3 || echo /usr/bin/python3)}
if [[ $BASE_PYTHON == /usr/bin/python3* ]]; then
    PACKAGES+=(python3-venv python3-dev)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${#missing[@]} packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run_logged apt-update apt-get update
    run_logged apt-install apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "system packages: all ${#PACKAGES[@]} present"
fi

# --- 2. the virtual environment -----------------------------------------------------------
"$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    [[ -x $VENV/bin/python ]] ||
    die "$BASE_PYTHON is older than 3.11; set DUNIX_PYTHON to a newer interpreter"

if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating venv $VENV with $BASE_PYTHON"
    rm -rf "$VENV"
    run_logged venv "$BASE_PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$VENV uses a python older than 3.11; remove it and set DUNIX_PYTHON"

# Reinstall only when what pip would install changed: pyproject.toml or the interpreter.
stamp=$VENV/.dunix-install-stamp
want_stamp=$( (
    cat "$REPO/pyproject.toml"
    "$VENV/bin/python" -c 'import sys; print(sys.version)'
) | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "$want_stamp" ]] ||
    [[ ! -x $VENV/bin/dunix ]] || [[ ! -x $VENV/bin/pytest ]]; then
    say "installing dunix[dev] into the venv (log: $LOGS/pip.log)"
    run_logged pip "$VENV/bin/python" -m pip install -e "${REPO}[dev]"
    printf '%s\n' "$want_stamp" >"$stamp"
else
    say "venv: up to date"
fi

# --- 3. CRIU and pycriu -------------------------------------------------------------------
"$REPO/scripts/build_criu.sh" "$VENV/bin/python" >/dev/null
criu_dir=$(readlink -f "$CACHE/criu")
[[ -x $criu_dir/src/criu/criu ]] || die "no criu binary in $criu_dir"
ln -sfn "$criu_dir/src/criu/criu" "$VENV/bin/criu"
# pycriu is generated in the CRIU build; a .pth file puts its py/ folder on sys.path.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth_line=$criu_dir/py
if [[ ! -f $site/dunix-pycriu.pth ]] || [[ $(cat "$site/dunix-pycriu.pth") != "$pth_line" ]]; then
    printf '%s\n' "$pth_line" >"$site/dunix-pycriu.pth"
fi
"$VENV/bin/python" -c 'import pycriu' 2>/dev/null ||
    die "pycriu does not import in $VENV (check $criu_dir/src/lib and protobuf<7)"

# --- 4. kernel settings (reset at boot, so every run) -------------------------------------
cur=$(cat /proc/sys/fs/pipe-max-size)
if ((cur < PIPE_MAX_SIZE_MIN)); then
    echo "$PIPE_MAX_SIZE_MIN" >/proc/sys/fs/pipe-max-size ||
        die "cannot raise /proc/sys/fs/pipe-max-size (CRIU post-copy needs >= 4 MiB)"
    say "fs.pipe-max-size: $cur -> $PIPE_MAX_SIZE_MIN"
fi

# --- 5. native helpers --------------------------------------------------------------------
run_logged native make -C "$REPO/native"
say "native: built"

# --- 6. final check -----------------------------------------------------------------------
if ! check_out=$("$VENV/bin/criu" check 2>&1); then
    printf '%s\n' "$check_out" >&2
    die "'criu check' failed (output above): CRIU cannot checkpoint here; a missing kernel feature or an unusual mount setup (e.g. a chroot) are the usual causes"
fi
say "criu check: $check_out"
say "setup done in $((SECONDS - start)) s"
