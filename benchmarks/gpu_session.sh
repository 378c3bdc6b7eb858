#!/usr/bin/env bash
# GPU validation in stages, each of which ends within ten minutes, so that a machine lent for a
# short while is used in few, full calls. Run from the repository root on a CUDA machine:
#
#   bash benchmarks/gpu_session.sh tests    OUT   # gpu-marked tests (about 4-6 min)
#   bash benchmarks/gpu_session.sh codec    OUT   # pass-1 study, then run.py gpu-codec
#   bash benchmarks/gpu_session.sh training OUT   # run.py gpu-training (manager, activations)
#
# Logs, results JSON and tables land in OUT (default gpu-session/), with the stage's
# environment in OUT/env-<stage>.txt. Each step has its own time limit, so a slow step costs
# its share and the next still runs. The exit status is the worst step's (124: a time limit).
# The project must be importable (pip install --no-deps --no-build-isolation -e . where there
# is no network; run that in the same call only with the tests stage, which leaves room for it).
set -u
stage=${1:?usage: gpu_session.sh tests|codec|training [OUT]}
out=${2:-gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
env_file="$out/env-$stage.txt"
status=0

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$python" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
    git rev-parse HEAD 2>/dev/null
} > "$env_file" 2>&1
cat "$env_file"

# Runs "$@" under a time limit, its output to $out/<name>.log; prints the log's tail.
step() {
    local name=$1 limit=$2 rc note=""
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    case $rc in
        124 | 137) note=" (time limit)"; rc=124 ;;
    esac
    echo "== $name: exit $rc$note"
    tail -n 25 "$out/$name.log"
    [ "$rc" -ne 0 ] && status=$rc
    return 0
}

# Copies the results JSON and tables this stage wrote for a run.py suite to $out.
collect() {
    find benchmarks/results -name "$1-*" -newer "$env_file" -exec cp {} "$out"/ \;
}

case $stage in
    tests)
        extra=""
        "$python" -c "import xdist" 2>/dev/null && extra="$extra -n 4"
        "$python" -c "import pytest_timeout" 2>/dev/null && extra="$extra --timeout=240"
        # $extra is split into words on purpose: it holds options only, no paths.
        # shellcheck disable=SC2086
        step tests 540 "$python" -m pytest -v -m gpu --benchmark-disable -p no:cacheprovider \
            --durations=25 -rfE $extra tests
        ;;
    codec)
        step histogram_study 120 "$python" benchmarks/histogram_study.py
        step bench_codec 400 "$python" benchmarks/run.py gpu-codec
        collect gpu-codec
        ;;
    training)
        step bench_training 560 "$python" benchmarks/run.py gpu-training
        collect gpu-training
        ;;
    *)
        echo "unknown stage: $stage (tests, codec or training)" >&2
        exit 2
        ;;
esac
exit "$status"
