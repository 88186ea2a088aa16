# Sourced by run-stack / run-tests: make .venv (once, or again when pyproject.toml changed)
# and activate it. Needs only python3 (3.11+) with venv; everything else comes from PyPI.
extras="${1:-}"
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "wattflow needs Python 3.11 or newer as python3" >&2; exit 1
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "python3 lacks venv/ensurepip: on Debian/Ubuntu run: apt-get install -y python3-venv" >&2
  exit 1
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
# shellcheck disable=SC1091
source .venv/bin/activate
