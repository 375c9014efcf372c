#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its chromedriver for the run report's browser test.
#
#   launch/install_browser.sh        (make test calls it; tests/test_report.py drives the browser itself)
#
# Idempotent: prints one line and returns at once when both are already there. Exits non-zero with one line that
# says why when it cannot install (no apt-get, not root and no sudo, apt failing).
set -euo pipefail

browser() { command -v chromium || command -v chromium-browser; }
driver() { command -v chromedriver || { [[ -x /usr/lib/chromium/chromedriver ]] && echo /usr/lib/chromium/chromedriver; }; }
installed() { browser > /dev/null && driver > /dev/null; }
version() { "$(browser)" --version 2> /dev/null | head -n 1; }

if installed; then
    echo "install_browser.sh: chromium and chromedriver already installed ($(version))"
    exit 0
fi
# shellcheck source=launch/apt_runner.sh
source "$(dirname "$0")/apt_runner.sh"
apt_runner install_browser.sh "the browser" "chromium chromium-driver"

apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver > "$apt_log" 2>&1
}
if ! install; then
    # A fresh container has no package lists yet; refresh them once and retry.
    "${sudo[@]}" apt-get update -q > "$apt_log" 2>&1 || true
    if ! install; then
        tail -n 5 "$apt_log" >&2
        echo "install_browser.sh: cannot install the browser: apt-get install chromium chromium-driver failed" \
            "(its last lines are above)" >&2
        exit 1
    fi
fi
if ! installed; then
    echo "install_browser.sh: apt-get succeeded but chromium or chromedriver is still not on PATH" >&2
    exit 1
fi
echo "install_browser.sh: installed $(version)"
