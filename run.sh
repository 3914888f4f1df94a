#!/usr/bin/env bash
# The project's entry point. Creates or reuses the virtual environment in .venv, installs
# torchkeep with everything it needs, then runs:
#   ./run.sh demo [--out DIR]   the end-to-end demo (torchkeep demo)
#   ./run.sh test [ARGS]        lint (ruff, mypy --strict) and the whole test suite (pytest ARGS)
#   ./run.sh bench [ARGS]       the benchmark (torchkeep bench)
#   ./run.sh fuzz [ARGS]        the atheris fuzzer of the parsers (1,000,000 inputs by default)
#   ./run.sh docs [DIR]         the documentation site (mkdocs, warnings are errors), into DIR
set -euo pipefail
cd "$(dirname "$0")"

venv=.venv
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    # The CPU build of torch for development and CI; the package itself accepts a range.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi

task=${1:-}
[ $# -gt 0 ] && shift
case "$task" in
    demo)
        exec "$venv/bin/torchkeep" demo "$@"
        ;;
    bench)
        exec "$venv/bin/torchkeep" bench "$@"
        ;;
    fuzz)
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev,fuzz]"
        exec "$venv/bin/python" fuzz/fuzz_parsers.py "$@"
        ;;
    docs)
        exec "$venv/bin/python" -m mkdocs build --strict -d "${1:-site}"
        ;;
    test)
        "$venv/bin/ruff" check src tests benchmarks fuzz examples docs/hooks
        "$venv/bin/mypy" --strict src/torchkeep
        exec "$venv/bin/python" -m pytest -q "$@"
        ;;
    *)
        echo "usage: ./run.sh demo [--out DIR] | test [pytest args] | bench [args] | fuzz [args] | docs [DIR]" >&2
        exit 2
        ;;
esac
