# Shared by scripts/demo and scripts/test: create a virtual environment when missing (.venv,
# or the folder named second) and install modelport with the given extras. Idempotent: a
# second run finds everything installed and returns fast.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/${2:-.venv}"
extras="$1"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.modelport-installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # torch is pinned to the CPU wheel that lies on this machine's disk (see constraints.txt).
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$root/constraints.txt" -e "$root[$extras]"
  touch "$stamp"
fi
