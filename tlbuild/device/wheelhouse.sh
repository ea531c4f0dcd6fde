#!/usr/bin/env bash
# Make a wheelhouse for an air-gapped device, on a machine with the network (same OS, CPU
# architecture and Python version as the device, or pass pip's --platform/--python-version
# options after TARGET):
#   tlbuild/device/wheelhouse.sh cpu ./wheelhouse        # TARGET: cpu, jetpack6, cuda12 or cuda13
# Copy ./wheelhouse to the device; there: bash wheelhouse/install.sh cpu
set -euo pipefail
py="${PYTHON:-python3}"  # the Python to install with (e.g. .venv/bin/python)
target="${1:?usage: wheelhouse.sh cpu|jetpack6|cuda12|cuda13 OUT [pip download options]}"
out="${2:?usage: wheelhouse.sh TARGET OUT}"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
req="$here/requirements-$target.txt"
[ -f "$req" ] || { echo "no requirements for target '$target' ($req)" >&2; exit 2; }
mkdir -p "$out"
"$py" -m pip download -q -r "$req" -d "$out" "$@"
"$py" -m pip wheel -q --no-deps -w "$out" "$here/../.."
cp "$here"/requirements-*.txt "$here/install.sh" "$out/"
echo "wheelhouse for $target in $out ($(ls "$out"/*.whl | wc -l) wheels)"
