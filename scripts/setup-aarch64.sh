#!/usr/bin/env bash
# Prepare an arm64 (aarch64) environment that runs lmc bundles under qemu-user on an x86-64 host, for
# `lmc verify BUNDLE --against MODEL --on aarch64`.
#
#   scripts/setup-aarch64.sh [DIR]        # default: $LMC_AARCH64_ROOT or ~/.cache/lmc/aarch64
#
# DIR/root   a minimal Debian arm64 root (debootstrap --foreign --variant=minbase, python3), its packages
#            unpacked with dpkg-deb: no second stage, so neither binfmt_misc nor a chroot is needed
# DIR/root/opt/lmc/site-packages   the aarch64 wheels of onnxruntime (the host's version) and numpy
# DIR/wheels the downloaded wheels (pip download --platform manylinux_2_28_aarch64)
# DIR/ready  what was installed; lmc checks it before running anything there
# lmc then runs `qemu-aarch64-static -L DIR/root -cpu CPU DIR/root/usr/bin/python3 -I compiler/target_worker.py …`
# (CPU: the bundle's target's isa.emulator_cpu); host paths (bundles, models) stay visible through -L.
#
# Needs root (apt-get, debootstrap) and Debian's and PyPI's servers. Idempotent: each step is skipped when
# its result is already there, so a second run changes nothing and takes a second or two.
set -euo pipefail

DIR=${1:-${LMC_AARCH64_ROOT:-$HOME/.cache/lmc/aarch64}}
# the host Python lmc runs under: its onnxruntime version is the one installed in the root
if [ -z "${PYTHON:-}" ]; then
    for PYTHON in python3 python; do "$PYTHON" -c 'import onnxruntime' 2>/dev/null && break; done
fi
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT="$DIR/root"
SITE="$ROOT/opt/lmc/site-packages"
START=$(date +%s)

say() { echo "setup-aarch64: $*"; }

# the Debian suite of the root: the host's when it is Debian, else bookworm (python 3.11)
SUITE=${DEBIAN_SUITE:-$( . /etc/os-release 2>/dev/null; [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}" )}
SUITE=${SUITE:-bookworm}

# 1. host tools
missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "qemu-user-static and debootstrap present"
fi
QEMU=$(command -v qemu-aarch64-static)

# 2. the arm64 root: debootstrap's first stage downloads every package (and unpacks the required ones); the
#    rest are unpacked here. Package maintainer scripts are not run: python3 and its libraries need none.
mkdir -p "$DIR"
if [ -x "$ROOT/usr/bin/python3" ] && [ -f "$ROOT/.lmc-unpacked" ]; then
    say "arm64 root present: $ROOT"
else
    rm -rf "$ROOT"
    say "debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 $SUITE $ROOT $MIRROR"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$ROOT" "$MIRROR" >/dev/null
    say "unpacking $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) packages into the root"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
    rm -f "$ROOT"/var/cache/apt/archives/*.deb
    touch "$ROOT/.lmc-unpacked"
fi
# qemu -L looks a path up in the root first and falls back to the host's: with the host's /sys and /proc/cpuinfo
# visible, onnxruntime's cpuinfo reads the x86 CPU's description and crashes. Empty ones in the root make it
# stop with a warning; onnxruntime then takes the emulated CPU's features from the auxiliary vector (HWCAP:
# dotprod, fp16, i8mm…), as it does on a device where cpuinfo fails.
mkdir -p "$ROOT/proc" "$ROOT/sys/devices/system/cpu"
for f in proc/cpuinfo sys/devices/system/cpu/possible sys/devices/system/cpu/present; do
    [ -e "$ROOT/$f" ] || : > "$ROOT/$f"
done

run() { "$QEMU" -L "$ROOT" -cpu cortex-a76 "$ROOT/usr/bin/python3" "$@"; }
ROOT_PY=$(run -c 'import sys; print("%d.%d" % sys.version_info[:2])')
say "root python $ROOT_PY (under qemu-aarch64-static -cpu cortex-a76)"

# 3. the aarch64 wheels, the host's onnxruntime and numpy versions
ORT_VERSION=$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)')
NUMPY_VERSION=$("$PYTHON" -c 'import numpy; print(numpy.__version__)')
WANT="onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION python==$ROOT_PY"
if [ -f "$DIR/ready" ] && [ "$(head -n1 "$DIR/ready")" = "$WANT" ] && [ -d "$SITE/onnxruntime" ]; then
    say "aarch64 wheels installed: $WANT"
else
    say "pip download onnxruntime==$ORT_VERSION numpy==$NUMPY_VERSION (manylinux_2_28_aarch64, python $ROOT_PY)"
    mkdir -p "$DIR/wheels"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
        --python-version "$ROOT_PY" --implementation cp -d "$DIR/wheels" \
        "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
    say "unpacking the wheels into $SITE"
    rm -rf "$SITE" && mkdir -p "$SITE"
    for whl in "$DIR/wheels"/onnxruntime-"$ORT_VERSION"-*.whl "$DIR/wheels"/numpy-"$NUMPY_VERSION"-*.whl; do
        "$PYTHON" -m zipfile -e "$whl" "$SITE"
    done
    rm -f "$DIR/ready"
fi

# 4. the check: onnxruntime imports and runs a model under emulation
if [ ! -f "$DIR/ready" ]; then
    say "checking onnxruntime under emulation"
    if ! CHECK=$(run -I -c '
import sys; sys.path.insert(0, sys.argv[1])
import platform, numpy as np, onnxruntime as ort
print(platform.machine(), ort.__version__, np.__version__)' "$SITE" 2>"$DIR/check.log"); then
        tail -n 5 "$DIR/check.log" >&2
        say "onnxruntime does not run under emulation (see $DIR/check.log)"
        exit 1
    fi
    say "$CHECK"
    { echo "$WANT"; echo "root=$ROOT"; echo "site=$SITE"; echo "qemu=$QEMU"; } > "$DIR/ready"
fi
say "ready: $DIR ($(( $(date +%s) - START )) s); lmc verify BUNDLE --against MODEL --on aarch64"
