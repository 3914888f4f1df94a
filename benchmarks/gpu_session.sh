#!/bin/sh
# The GPU checks of one lent GPU machine, in one command: the CUDA tests, the GPU benchmark and
# the async-save CUDA case, sized to finish in a few minutes. Run from the repository root:
#
#   sh benchmarks/gpu_session.sh                  # on the GPU machine; results in $OUT (or .gpu-out)
#   DEVICE=cpu SIZE_MIB=16 REPEATS=1 sh benchmarks/gpu_session.sh   # a dry run of the same steps
#
# It uses the machine's own python3 (with torch, safetensors, xxhash and rich, as the GPU image
# has them) and the source tree, not an installed torchkeep. Every step runs even when one
# before it failed; the exit status is the number of steps that failed.
set -u
DEVICE=${DEVICE:-cuda}
SIZE_MIB=${SIZE_MIB:-1024}
REPEATS=${REPEATS:-5}
PYTHON=${PYTHON:-python3}
out=${OUT:-.gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work=$(mktemp -d "$PWD/.gpu-work-XXXXXX")  # on the disk, not a tmpfs /tmp
failed=0

step() {
    name=$1
    shift
    echo "== $name: $*"
    start=$(date +%s)
    if "$@" >"$out/$name.log" 2>&1; then status=ok; else status=FAILED; failed=$((failed + 1)); fi
    echo "== $name: $status in $(($(date +%s) - start)) s"
    tail -n 25 "$out/$name.log"
}

{
    "$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    uname -r
    nproc
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step test_cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step gpu_bench "$PYTHON" benchmarks/gpu.py --size-mib "$SIZE_MIB" --repeats "$REPEATS" \
    --device "$DEVICE" --dir "$work" --out "$out/gpu.md"
step async_save "$PYTHON" benchmarks/async_save.py --size-mib "$SIZE_MIB" --repeats "$REPEATS" \
    --device "$DEVICE" --no-steps --dir "$work" --out "$out/async.md"
rm -rf "$work"
echo "== $failed step(s) failed; logs and tables in $out"
exit "$failed"
