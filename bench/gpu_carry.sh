#!/usr/bin/env bash
# Builds what bench/gpu.sh carries to the GPU machine, which has torch, torchvision, transformers,
# Pillow, pytest and prometheus-client but no Celery, Redis, pydantic or boto3 and no registry:
#
#   bash bench/gpu_carry.sh [DEST]      # DEST defaults to the repo root
#
#   DEST/.whl/    py3.12 manylinux x86_64 wheels of the service's packages the GPU image lacks, at
#                 the versions installed in BENCH_VENV_PYTHON (the dev venv: what the tests here
#                 ran), fetched with `pip download --no-deps --only-binary=:all:` (~23 MB)
#   DEST/.redis/  this machine's redis-server binary plus the shared libraries `ldd` lists, minus
#                 glibc's own (libc, libm, ld-linux: the GPU image's newer glibc serves them), run
#                 there with LD_LIBRARY_PATH=DEST/.redis/lib (~12 MB)
#
# Both folders are git-ignored (.gitignore, .git/info/exclude); name them in the device tool's
# `carry` (they count towards its 64 MiB with the checkout). Needs a registry (pip) and a
# Debian/Ubuntu redis-server here. Knobs: BENCH_VENV_PYTHON (/work/main/.venv/bin/python, else
# python3), BENCH_PIP (that Python's pip), BENCH_REDIS_BINARY (redis-server on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-$PWD}
VENV_PY=${BENCH_VENV_PYTHON:-/work/main/.venv/bin/python}
[ -x "$VENV_PY" ] || VENV_PY=python3
PIP=(${BENCH_PIP:-$VENV_PY -m pip})
# The service's runtime packages (pyproject's core dependencies and theirs) that the GPU image
# (device README, KINDS.md's package list) does not hold at a version that satisfies them.
PACKAGES="celery kombu billiard vine amqp click click-didyoumean click-repl click-plugins
prompt_toolkit wcwidth tzlocal python-dateutil redis pydantic pydantic-core pydantic-settings
python-dotenv typing-inspection typing-extensions annotated-types boto3 botocore s3transfer jmespath
py-spy"  # the last: not the service's, bench/gil_profile.py's sampler (a static binary in its wheel)

pins=$("$VENV_PY" - $PACKAGES <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)  # not in that venv: the newest wheel
EOF
)
mkdir -p "$DEST/.whl"
rm -f "$DEST"/.whl/*.whl
# shellcheck disable=SC2086 # one argument per pin
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST/.whl" $pins
echo "gpu_carry.sh: $(ls "$DEST"/.whl/*.whl | wc -l) wheels in $DEST/.whl ($(du -sh "$DEST/.whl" | cut -f1))"

binary=$(readlink -f "${BENCH_REDIS_BINARY:-$(command -v redis-server)}")
rm -rf "$DEST/.redis"
mkdir -p "$DEST/.redis/lib"
cp "$binary" "$DEST/.redis/redis-server"
ldd "$binary" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
        *) cp -L "$lib" "$DEST/.redis/lib/" ;;
    esac
done
LD_LIBRARY_PATH="$DEST/.redis/lib" "$DEST/.redis/redis-server" --version
echo "gpu_carry.sh: $DEST/.redis: redis-server + $(ls "$DEST/.redis/lib" | wc -l) libraries ($(du -sh "$DEST/.redis" | cut -f1))"
for ignored in .whl .redis; do
    git check-ignore -q "$DEST/$ignored" 2>/dev/null || echo "gpu_carry.sh: note: $DEST/$ignored is not git-ignored"
done
