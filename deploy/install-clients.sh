#!/usr/bin/env bash
# Makes the real clients the `tally serve` system tests drive available, and
# exports their locations:
#   TALLY_CLIENT_PYTHON  a Python with psycopg 3, pyarrow, ADBC Flight SQL and
#                        prometheus_client (a private virtualenv under
#                        ~/.cache/tally-tools, never the system Python)
#   TALLY_PGJDBC_JAR     pgjdbc (Debian libpostgresql-jdbc-java)
#   psql                 Debian postgresql-client
#   chromium             Debian chromium (headless, for the page tests)
#   openssl              for the TLS test's self-signed certificate
# Source it (`. deploy/install-clients.sh`) or run it to just install.
TALLY_TOOLS="${TALLY_TOOLS:-$HOME/.cache/tally-tools}"
TALLY_CLIENT_PINS="psycopg[binary]==3.3.9 pyarrow adbc-driver-manager==1.13.0 adbc-driver-flightsql==1.13.0 prometheus-client==0.26.0"

tally_install_clients() {
  local venv="$TALLY_TOOLS/clients-1"
  if ! "$venv/bin/python" -c 'import psycopg, pyarrow.flight, adbc_driver_flightsql.dbapi, prometheus_client' >/dev/null 2>&1; then
    echo "installing Python clients ($TALLY_CLIENT_PINS) into $venv" >&2
    mkdir -p "$TALLY_TOOLS"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      echo "ERROR: cannot create a virtualenv at $venv (python3 -m venv failed; on Debian: apt-get install python3-venv)." >&2
      return 1
    fi
    # shellcheck disable=SC2086
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $TALLY_CLIENT_PINS; then
      echo "ERROR: pip could not install $TALLY_CLIENT_PINS from PyPI; check network access to PyPI." >&2
      return 1
    fi
  fi
  export TALLY_CLIENT_PYTHON="$venv/bin/python"

  local missing=()
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
  command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
  [ -f /usr/share/java/postgresql.jar ] || missing+=(libpostgresql-jdbc-java)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian)" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null; then
      echo "ERROR: apt-get could not install ${missing[*]}; install them by hand." >&2
      return 1
    fi
  fi
  export TALLY_PGJDBC_JAR=/usr/share/java/postgresql.jar
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  tally_install_clients
  echo "TALLY_CLIENT_PYTHON=$TALLY_CLIENT_PYTHON TALLY_PGJDBC_JAR=$TALLY_PGJDBC_JAR"
else
  tally_install_clients || return 1
fi
