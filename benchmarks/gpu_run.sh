#!/usr/bin/env bash
# benchmarks/bench_gpu.py on a GPU machine without internet (issue 23, item 5; docs/scale.md "GPU").
#
#   bash benchmarks/gpu_run.sh          # from the repo root; results in $OUT (default /tmp/piaa-gpu)
#
# The machine has Python with torch (CUDA), torchvision, numpy, pillow, timm, huggingface_hub,
# safetensors, regex, tqdm, click, typing-extensions; what piaa's index path needs beyond that
# travels as wheels in .whl/ (see docs/scale.md for the pip download line) and is installed
# with --no-index into $SITE, which goes first on PYTHONPATH. The repo is not pip-installed:
# plugins/ and migrations/ are importable as piaa_index_plugins / piaa_index_migrations through
# two symlinks, as setuptools' package-dir maps them.
#
# Two runs, bf16 then fp16; the first makes the photos, the second reuses them. Each run is
# bounded by RUN_TIMEOUT seconds (about 2 min each on an H200; 6 min for the whole script at
# most). Overrides for a dry run elsewhere: PYTHON, WHEELS, SITE, DEVICE, PRECISIONS,
# RUN_TIMEOUT, BENCH_ARGS.
set -euo pipefail
OUT=${OUT:-/tmp/piaa-gpu}
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3 # the GPU machine's Python with torch
fi
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
DEVICE=${DEVICE:-cuda}
PRECISIONS=${PRECISIONS:-bf16 fp16}
RUN_TIMEOUT=${RUN_TIMEOUT:-170}
PHOTOS=${PHOTOS:-/tmp/piaa-gpu-photos}
mkdir -p "$OUT"

{
    date -u
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl
    else  # a venv made without pip (uv): these wheels have no .data, so unpacking installs them
        echo "no pip for $PY: unpacking the wheels into $SITE"
        for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
    fi
    mkdir -p "$SITE.links"
    ln -sfn "$PWD/plugins" "$SITE.links/piaa_index_plugins"
    ln -sfn "$PWD/migrations" "$SITE.links/piaa_index_migrations"
    export PYTHONPATH="$SITE:$SITE.links:$PWD"
    export PYTHONUNBUFFERED=1
    nvidia-smi -L || echo "nvidia-smi: not here"
    "$PY" - <<'EOF'
import sys, torch, torchvision, open_clip, faiss, sqlalchemy, alembic, piaa_index_migrations
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision",
      torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
      "open_clip", open_clip.__version__, "faiss", faiss.__version__,
      "sqlalchemy", sqlalchemy.__version__, "alembic", alembic.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 30, "GiB")
EOF
    failed=0
    for precision in $PRECISIONS; do
        echo "== bench_gpu.py --device $DEVICE --precision $precision"
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
        timeout "$RUN_TIMEOUT" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" \
            --precision "$precision" --photos "$PHOTOS" \
            --json "$OUT/bench_gpu_$precision.json" ${BENCH_ARGS:-} ||
            { echo "== the $precision run ended with status $? (124: over ${RUN_TIMEOUT} s)"; failed=1; }
    done
    date -u
    exit "$failed"
} 2>&1 | tee "$OUT/bench_gpu.log"
