#!/usr/bin/env bash
# Install tlbuild's device side (classify, bench DIR, build --on-device; no PyTorch) in one
# command, into the active Python environment:
#   bash tlbuild/device/install.sh cpu                 # from PyPI and this checkout
#   bash wheelhouse/install.sh cpu             # offline, from a wheelhouse (wheelhouse.sh)
# TARGET: cpu, jetpack6, cuda12 or cuda13 (the requirements-TARGET.txt beside this script).
set -euo pipefail
py="${PYTHON:-python3}"  # the Python to install with (e.g. .venv/bin/python)
target="${1:?usage: install.sh cpu|jetpack6|cuda12|cuda13}"
here="$(cd "$(dirname "$0")" && pwd)"
req="$here/requirements-$target.txt"
[ -f "$req" ] || { echo "no requirements for target '$target' ($req)" >&2; exit 2; }
if compgen -G "$here/tlbuild-*.whl" > /dev/null; then  # a wheelhouse: nothing from the network
    "$py" -m pip install -q --no-index --find-links "$here" -r "$req"
    # The wheel file itself: a name would leave an older tlbuild in place ("already satisfied").
    "$py" -m pip install -q --no-index --no-deps --force-reinstall "$here"/tlbuild-*.whl
else
    "$py" -m pip install -q -r "$req"
    "$py" -m pip install -q --no-deps "$here/../.."
fi
"$py" -m tlbuild --version
