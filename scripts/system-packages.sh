#!/usr/bin/env bash
# Installs the Debian packages the engine's tests and benchmarks talk to:
# postfix (smtp-sink as a remote MX, and Postfix itself for bench comparisons),
# opendkim + opendkim-tools (independent DKIM verification), redis-server
# (multi-node tests), chromium + chromium-driver (dashboard test).
# Only missing packages are installed; `apt-get update` runs once, when needed.
set -euo pipefail
PACKAGES=(postfix opendkim opendkim-tools redis-server chromium chromium-driver)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
