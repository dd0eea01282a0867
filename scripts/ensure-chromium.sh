#!/usr/bin/env bash
# Make sure a headless Chromium and its ChromeDriver are available and print the driver's path.
#
# Idempotent: when both are already there this is a fast no-op. Otherwise it installs Debian's
# `chromium` and `chromium-driver` packages with apt-get (via sudo when not root). Playwright's
# and Selenium Manager's browser downloads are not used: they need hosts beyond the package
# registries. The browser tests (tests/e2e/browser.py) look for the same two paths.
#
# Overrides: $CHROMIUM_BINARY and $CHROMEDRIVER_PATH (default /usr/bin/chromium, /usr/bin/chromedriver).
set -euo pipefail

browser=${CHROMIUM_BINARY:-/usr/bin/chromium}
driver=${CHROMEDRIVER_PATH:-/usr/bin/chromedriver}

if [[ -x "$browser" && -x "$driver" ]]; then
    echo "$driver"
    exit 0
fi

echo "ensure-chromium: $browser or $driver not found; installing Debian packages 'chromium' and 'chromium-driver'" >&2

# shellcheck source=apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
apt_install ensure-chromium chromium chromium-driver

if [[ -x "$browser" && -x "$driver" ]]; then
    echo "$driver"
    exit 0
fi
echo "ensure-chromium: chromium-driver was installed but $browser or $driver is still missing" >&2
exit 1
