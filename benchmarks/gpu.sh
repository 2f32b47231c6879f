#!/usr/bin/env bash
# deme-jax against PyTorch/diffusers on one NVIDIA GPU (benchmarks/gpu.py), then the fast tests on it.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: /tmp/deme-jax-gpu
#
# The GPU box needs jax (CUDA), flax, optax, orbax-checkpoint and torch, and no network. ml-collections, clu
# and diffusers come as wheels in the project's .whl/, fetched beforehand on a machine with the package index,
# from the project root (--python-version: the box's Python):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl ml-collections clu diffusers importlib-metadata
# They are installed into a temporary directory put on PYTHONPATH. Where TensorFlow is not installed, the
# modules that import it get stand-ins (gpu.py's stub_tensorflow_users) in every Python process of the run,
# benchmark and tests (and the `deme` commands tests start), through a sitecustomize.py in that directory.
#
# Benchmark: at most about 5 minutes on an H200 (gpu.py --budget); results in OUT_DIR and
# benchmarks/results/gpu-<card>.json. Tests: pytest -m "not slow", stopped after TEST_S seconds (default 600;
# 0 skips them), modules that fail to import recorded and skipped; summary in OUT_DIR/tests.txt, output in
# OUT_DIR/tests.log.
# Environment: PYTHON (default python3), BENCH_ARGS (more gpu.py arguments: --tiny, --sections deme, --budget
# 900), TEST_S. A check on a machine without a GPU: BENCH_ARGS=--tiny TEST_S=0 bash benchmarks/gpu.sh /tmp/x
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/deme-jax-gpu}
python=${PYTHON:-python3}
tests_s=${TEST_S:-600}
mkdir -p "$out"
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT

if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
else
    echo "no .whl/*.whl: using the installed ml-collections, clu and diffusers"
fi
cat > "$site/sitecustomize.py" <<'EOF'
from benchmarks.gpu import stub_tensorflow_users

stub_tensorflow_users()
EOF
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
"$python" benchmarks/gpu.py --out "$out" ${BENCH_ARGS:-}
bench=$?

if [ "$tests_s" -gt 0 ]; then
    echo "tests: at most $tests_s s, output in $out/tests.log"
    timeout -s INT -k 30 "$tests_s" "$python" -m pytest -q -m "not slow" -p no:cacheprovider \
        --continue-on-collection-errors > "$out/tests.log" 2>&1
    code=$?
    {
        tail -n 1 "$out/tests.log"
        echo "pytest exit code $code$([ "$code" -eq 124 ] && echo ": stopped after $tests_s s")"
        if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tensorflow") is None)'; then
            echo "TensorFlow not installed: clu.metric_writers, clu.periodic_actions and tensorflow_datasets are" \
                 "stand-ins; tests that use them fail"
        fi
        echo "test modules that failed to import (not run):"
        grep -E '^ERROR [^ :]+\.py( - |$)' "$out/tests.log" || echo "none"
    } > "$out/tests.txt"
    cat "$out/tests.txt"
fi
exit $bench
