#!/usr/bin/env bash
# One entry point for a fresh machine: creates (or reuses) ./.venv, installs what is missing, then runs.
#   ./dev.sh demo [options]    fit + evaluate PatchCore on real solar-cell images (defectscope demo)
#   ./dev.sh test [pytest args] run the test suite
#   ./dev.sh setup             only create/update the virtual environment
#   ./dev.sh run ARGS...       run `defectscope ARGS...` inside the environment
#   ./dev.sh check             lint (ruff), format check, types (mypy) and the docs site (mkdocs --strict)
#   ./dev.sh docs [serve]      build the docs site into ./site (or serve it on http://127.0.0.1:8000)
# Environment: DEFECTSCOPE_VENV (default .venv), DEFECTSCOPE_TORCH (default "torch==2.14.1 torchvision==0.29.1").
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DEFECTSCOPE_VENV:-.venv}"
TORCH="${DEFECTSCOPE_TORCH:-torch==2.14.1 torchvision==0.29.1}"

setup() {
    if [ -f "$VENV/pyvenv.cfg" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "dev.sh: $VENV is incomplete (no working pip: an earlier setup was interrupted); making it again" >&2
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || { echo "defectscope needs Python >= 3.10 (found $(python3 --version))" >&2; exit 2; }
        python3 -m venv "$VENV"
    fi
    local stamp="$VENV/.defectscope-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ dev.sh -nt "$stamp" ]; then
        echo "dev.sh: installing into $VENV (torch first, then defectscope with its extras)" >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check $TORCH
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,lite,demo,serve,export,ray,docs,dev]"
        touch "$stamp"
    fi
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    demo) setup; exec "$VENV/bin/defectscope" demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    run) setup; exec "$VENV/bin/defectscope" "$@" ;;
    check)
        setup
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy"
        "$VENV/bin/mkdocs" build --strict --quiet --site-dir "$(mktemp -d)"
        echo "dev.sh check: ruff, ruff format, mypy and mkdocs --strict are clean" ;;
    docs)
        setup
        if [ "${1:-}" = serve ]; then exec "$VENV/bin/mkdocs" serve; fi
        exec "$VENV/bin/mkdocs" build --strict ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
