# Sourced by scripts/setup_python.sh and scripts/setup_cuda.sh: one way to build a Python venv
# from a requirements file and keep it.
#
#   cached_venv NAME REQUIREMENTS FINISH
#
# prints the venv's path, $LMFORGE_CACHE/NAME-<hash of REQUIREMENTS> (default ~/.cache/lmforge),
# after building it if needed: a changed requirement builds a new venv and an unchanged one is
# reused without touching the network. `FINISH VENV` runs after pip: a check, or set-up of what
# the wheels leave out; it must return non-zero on failure, as it runs without `set -e`. A
# `complete` marker is written last, so an interrupted or failed install is never mistaken for a
# finished one. Everything but the path goes to stderr.
#
# Env: LMFORGE_CACHE, PYTHON (the interpreter to build from, default python3).
cached_venv() {
    local name=$1 requirements=$2 finish=$3
    local cache="${LMFORGE_CACHE:-$HOME/.cache/lmforge}"
    local venv
    venv="$cache/$name-$(sha256sum "$requirements" | cut -c1-12)"
    # Each step returns on failure itself: callers run this inside `$(...)`, where bash turns
    # `set -e` off, and a failed install must not get its marker.
    if [ ! -f "$venv/complete" ]; then
        echo "$name: building $venv from $requirements" >&2
        rm -rf "$venv" && mkdir -p "$cache" || return
        "${PYTHON:-python3}" -m venv "$venv" >&2 || return
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2 || return
        "$finish" "$venv" >&2 || return
        touch "$venv/complete" || return
    fi
    echo "$venv"
}
