#!/usr/bin/env bash
# Install what runs lmc's C bundles on emulated microcontroller boards, for
# `lmc verify BUNDLE --against MODEL --on cortex-m55|cortex-m7` (lmc.targets.cbundle.board):
#
#   scripts/setup-mcu.sh
#
# gcc-arm-none-eabi        arm-none-eabi-gcc (Debian 12: GCC 12.2), the cross compiler for Cortex-M
# libnewlib-arm-none-eabi  newlib, newlib-nano and librdimon (semihosting: fopen/fread/fwrite reach the host's files)
# qemu-system-arm          the boards mps3-an547 (Cortex-M55) and mps2-an500 (Cortex-M7)
#
# Needs root (apt-get) and Debian's servers. Idempotent: when the three tools are there it changes nothing and
# says so. Exits non-zero with one line naming what is missing when it cannot install them.
set -euo pipefail

say() { echo "setup-mcu: $*"; }
fail() { echo "setup-mcu: $*" >&2; exit 1; }
START=$(date +%s)

missing=()
command -v arm-none-eabi-gcc >/dev/null || missing+=(gcc-arm-none-eabi)
# librdimon (semihosting) and newlib-nano come with libnewlib-arm-none-eabi
if ! command -v arm-none-eabi-gcc >/dev/null \
   || [ -z "$(arm-none-eabi-gcc -mcpu=cortex-m55 -mfloat-abi=hard -print-file-name=librdimon.a | grep /)" ] \
   || [ ! -e "$(arm-none-eabi-gcc -print-file-name=nano.specs)" ]; then
    missing+=(libnewlib-arm-none-eabi)
fi
command -v qemu-system-arm >/dev/null || missing+=(qemu-system-arm)

if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || fail "needs root to install ${missing[*]} (run it as root, or: sudo apt-get install ${missing[*]})"
    command -v apt-get >/dev/null || fail "no apt-get here: install ${missing[*]} (or their equivalents) yourself"
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get update"
    apt-get update -qq || fail "apt-get update failed (no network or no Debian mirror?)"
    say "installing ${missing[*]} (apt-get install --no-install-recommends)"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
else
    say "gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm present: nothing to install"
fi

# the check: each tool runs and knows what lmc asks of it
command -v arm-none-eabi-gcc >/dev/null || fail "arm-none-eabi-gcc still missing after installing"
command -v qemu-system-arm >/dev/null || fail "qemu-system-arm still missing after installing"
[ -e "$(arm-none-eabi-gcc -print-file-name=nano.specs)" ] || fail "newlib-nano (nano.specs) missing"
for board in mps3-an547 mps2-an500; do
    qemu-system-arm -M help | grep -q "^$board " || fail "qemu-system-arm has no board $board"
done
say "$(arm-none-eabi-gcc -dumpversion | sed 's/^/arm-none-eabi-gcc /'); $(qemu-system-arm --version | head -n1)"
say "ready ($(( $(date +%s) - START )) s): lmc verify BUNDLE --against MODEL --on cortex-m55|cortex-m7"
