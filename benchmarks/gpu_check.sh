#!/usr/bin/env bash
# One prepared call on a GPU machine: the CUDA tests, the throughput table against a hand-written
# loop, and the 200-epoch CIFAR-10-LT IF100 table (configs/bench/gpu-cifar10.yaml, all runs at
# once), in at most ~8 minutes on one H100 / H200 with nothing installed beyond PyTorch and no
# internet. Writes gpu_check.{json,md} (machine, commit, command, every step's result) and the
# suite's results into OUT.
#
#   python benchmarks/gpu_pack.py                    # here, once: .gpu/ (data pack, wheels)
#   bash benchmarks/gpu_check.sh                     # there (carry .gpu); OUT=${OUT:-...}
#   bash benchmarks/gpu_check.sh --quick             # a CPU smoke run of the whole script
#
# Options: --quick (tiny settings, any device, well under a minute of training), --out DIR
# (default $OUT, else benchmarks/results/gpu-check), --data DIR|FILE.tgz (default .gpu/cifar10-lt.tgz,
# else $LONGTAIL_DATA), --budget SECONDS (default 470: the steps' time limits are cut from it),
# --jobs N (runs at once in the suite; default 8).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

# what the GPU machine lacks travels as wheels in .gpu/whl (benchmarks/gpu_pack.py)
if ! python3 -c "import pydantic" 2>/dev/null; then
  if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/longtail-site .gpu/whl/*.whl || exit 2
    export PYTHONPATH="/tmp/longtail-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: pydantic is not installed and .gpu/whl/ holds no wheels: run" \
         "'python benchmarks/gpu_pack.py' where pip works and carry .gpu" >&2
    exit 2
  fi
fi
# the package from this checkout, without installing it
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
