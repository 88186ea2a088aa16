# Sourced by run-stack / run-tests / run-bench. Defines `use_venv [EXTRA]`: make .venv (once, or
# again when pyproject.toml changed) with wattflow installed (with the optional EXTRA, e.g.
# `test`) and activate it. Needs only python3 (3.11+) with venv; the rest comes from PyPI.
# A function, not code run at source time: a sourced script would see its caller's "$@".
use_venv() {
  local extras="${1:-}" stamp base
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "wattflow needs Python 3.11 or newer as python3" >&2; return 1
  fi
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "python3 lacks venv/ensurepip: on Debian/Ubuntu run: apt-get install -y python3-venv" >&2
    return 1
  fi
  base=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  stamp="$base${extras:+-$extras}"
  # an install with the test extra serves the plain commands too
  if [ ! -f "$stamp" ] && ! { [ -z "$extras" ] && compgen -G "$base-*" >/dev/null; }; then
    echo "setting up .venv (first run, or pyproject.toml changed): installing dependencies..." >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv || return 1
    .venv/bin/python -m pip install --quiet --upgrade pip || return 1
    .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}" || return 1
    touch "$stamp"
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
}
