#!/usr/bin/env bash
# Installs the Debian packages the engine's tests and benchmarks talk to:
# python3-venv (scripts/install.sh makes the venv with Debian's own Python),
# postfix (smtp-sink as a remote MX, and Postfix itself for bench comparisons),
# opendkim + opendkim-tools (independent DKIM verification), redis-server
# (multi-node tests), chromium + chromium-driver (dashboard test), rabbitmq-server
# (the AMQP event stream: tests start private brokers on free loopback ports),
# nodejs (Haraka, a bench peer, from npm; it needs Node.js >= 20 with npm, i.e.
# deb.nodesource.com's nodejs: Debian 12's own is 18). Exim, the other bench peer,
# is not installed (it conflicts with postfix): the bench unpacks its .deb itself.
# Only missing packages are installed; `apt-get update` runs once, when needed.
set -euo pipefail
PACKAGES=(python3-venv postfix opendkim opendkim-tools redis-server chromium chromium-driver
          rabbitmq-server nodejs)
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
# The package starts a system broker (5672, epmd on 4369, every interface) that nothing
# here uses: the tests run their own. Stop it, only when this script installed it.
if [[ " ${missing[*]} " == *" rabbitmq-server "* ]] && command -v systemctl >/dev/null; then
  $SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true
fi
