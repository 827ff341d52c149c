#!/usr/bin/env bash
# Debian's chromium for `make test-ui`, installed only when `chromium` is not on PATH.
# Needs apt-get and root (or password-less sudo); no other way of getting a browser is tried.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
fail() {
    echo "error: make test-ui needs Debian's chromium and cannot install it: $1" >&2
    echo "       install it yourself (apt-get install chromium) and run make test-ui again" >&2
    exit 1
}
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this machine"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null \
        || fail "not root, and no password-less sudo"
    sudo=(sudo -n)
fi
echo "chromium is missing: apt-get update && apt-get install -y chromium" >&2
"${sudo[@]}" apt-get update -q || fail "apt-get update failed (no network to the Debian mirror?)"
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium \
    || fail "apt-get install chromium failed"
command -v chromium >/dev/null 2>&1 || fail "apt-get installed chromium but it is not on PATH"
