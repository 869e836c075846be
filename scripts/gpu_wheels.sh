#!/usr/bin/env bash
# Fetches, on a machine with internet, the Python packages that fcos-d2 needs and the GPU machine
# lacks, as wheels for its Python 3.12, into an ignored folder that travels with the working tree.
# scripts/gpu_check.sh installs them there (no network) with `pip install --no-index --no-deps
# --target DIR` into a folder put on PYTHONPATH: nothing of that machine's own packages (torch,
# numpy, ...) is upgraded, downgraded or replaced.
#
#   bash scripts/gpu_wheels.sh          # -> .gpu_wheels/*.whl and .gpu_wheels/MANIFEST.txt
#
# What the GPU machine has (README, "GPU"): Python 3.12, torch 2.11 (CUDA 13), torchvision 0.26,
# numpy 2.x, onnx, onnxruntime, opencv-python-headless, matplotlib, tensorboard, pytest, pyyaml,
# tabulate, tqdm, cloudpickle, portalocker, pillow, packaging, typing-extensions. Missing, and
# fetched here with their own missing requirements: detectron2 and fvcore, iopath, pycocotools,
# yacs, omegaconf, hydra-core, antlr4-python3-runtime, termcolor, faster-coco-eval.
#
# detectron2 comes, as in scripts/setup_env.sh, from the PyPI republish sal-detectron2 0.7.2. Its
# only wheel is tagged cp310; only its compiled _C extension is version-specific, so the wheel is
# renamed py3-none-any and gpu_check.sh deletes the _C file after installing it (detectron2 then
# uses its pure-Python paths; fcos-d2 needs none of its compiled ops). Its metadata asks for
# numpy<2, which --no-deps ignores: FCOS's code paths run on numpy 2 (README, "GPU").
#
# Environment knobs:
#   PYTHON                         interpreter whose pip downloads (default: .venv/bin/python if
#                                  present, else python3)
#   FCOS_D2_GPU_WHEELS             destination folder (default: .gpu_wheels in the repository)
#   FCOS_D2_GPU_WHEELS_LIMIT_MIB   largest total size of the wheels (default 40: the working tree
#                                  and the wheels must fit in the 64 MiB that travel)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DEST="${FCOS_D2_GPU_WHEELS:-$ROOT/.gpu_wheels}"
LIMIT_MIB="${FCOS_D2_GPU_WHEELS_LIMIT_MIB:-40}"
TARGET_PYTHON=3.12

# The versions the CPU set-up installs (scripts/setup_env.sh), so both machines run the same code.
D2="sal-detectron2==0.7.2"
WHEELS=(  # published as wheels: fetched for CPython 3.12 on manylinux x86-64
    pycocotools==2.0.11
    yacs==0.1.8
    termcolor==3.3.0
    omegaconf==2.3.1
    hydra-core==1.3.8
    faster-coco-eval==1.7.2  # COCO evaluation (fcos_d2/evaluation.py); pycocotools otherwise
)
SDISTS=(  # pure Python, published as source only: built into py3-none-any wheels here
    fvcore==0.1.5.post20221221
    iopath==0.1.10
    antlr4-python3-runtime==4.9.3
)
PLATFORM_ARGS=(
    --only-binary=:all: --python-version "$TARGET_PYTHON" --implementation cp
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64
)
PIP=("$PYTHON" -m pip --disable-pip-version-check)

step() { echo "==> [gpu_wheels] $1"; }
fail() { echo "gpu_wheels.sh: error: $1" >&2; exit 1; }

step "fetching into $DEST with $("${PIP[@]}" --version | cut -d' ' -f1-2) of $PYTHON"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/out"

step "wheels for CPython $TARGET_PYTHON: ${WHEELS[*]}"
"${PIP[@]}" download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$work/out" "${WHEELS[@]}"

step "pure-Python source releases built into wheels: ${SDISTS[*]}"
"${PIP[@]}" wheel -q --no-deps -w "$work/built" "${SDISTS[@]}"
for wheel in "$work"/built/*.whl; do
    case "$wheel" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$wheel" "$work/out/" ;;
        *) fail "$(basename "$wheel") is not a pure-Python wheel: it cannot run on that machine" ;;
    esac
done

step "detectron2: $D2, renamed py3-none-any"
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$work/d2" "$D2"
d2_wheel="$(ls "$work"/d2/*.whl)"
mv "$d2_wheel" "$work/out/$(basename "$d2_wheel" | sed -E 's/-cp3[0-9]+-[a-z0-9_]+-[a-z0-9_.]+\.whl$/-py3-none-any.whl/')"

count="$(ls "$work"/out/*.whl | wc -l)"
expected=$((${#WHEELS[@]} + ${#SDISTS[@]} + 1))
[ "$count" -eq "$expected" ] || fail "expected $expected wheels, got $count: $(ls "$work/out")"

total_bytes="$(cat "$work"/out/*.whl | wc -c)"
limit_bytes=$((LIMIT_MIB * 1024 * 1024))
[ "$total_bytes" -le "$limit_bytes" ] \
    || fail "the wheels take $((total_bytes / 1024 / 1024)) MiB, over the ${LIMIT_MIB} MiB limit"

rm -rf "$DEST"
mkdir -p "$DEST"
mv "$work"/out/*.whl "$DEST/"
{
    echo "# Wheels for the GPU machine (Python $TARGET_PYTHON), made by scripts/gpu_wheels.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# bytes  sha256  file"
    for wheel in "$DEST"/*.whl; do
        echo "$(wc -c <"$wheel")  $(sha256sum "$wheel" | cut -d' ' -f1)  $(basename "$wheel")"
    done
} >"$DEST/MANIFEST.txt"

step "fetched $count wheels, $(awk "BEGIN {printf \"%.1f\", $total_bytes / 1048576}") MiB in all (limit ${LIMIT_MIB} MiB):"
for wheel in "$DEST"/*.whl; do
    printf '    %8.1f KiB  %s\n' "$(awk "BEGIN {print $(wc -c <"$wheel") / 1024}")" "$(basename "$wheel")"
done

# What travels to the GPU machine: tracked files, untracked files git does not ignore, and the
# carried wheels. The device tool's limit is 64 MiB in all.
tree_bytes=0
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    tree_bytes="$(
        { git -C "$ROOT" ls-files -z; git -C "$ROOT" ls-files -z --others --exclude-standard; } \
            | (cd "$ROOT" && xargs -0 -r cat 2>/dev/null) | wc -c
    )"
fi
all_mib="$(awk "BEGIN {printf \"%.1f\", ($tree_bytes + $total_bytes) / 1048576}")"
echo "    working tree $(awk "BEGIN {printf \"%.1f\", $tree_bytes / 1048576}") MiB + wheels = $all_mib MiB to carry (limit 64 MiB)"
[ "$((tree_bytes + total_bytes))" -le $((64 * 1024 * 1024)) ] \
    || fail "the working tree and the wheels take $all_mib MiB, over the 64 MiB that travel"
step "done: run 'bash scripts/gpu_check.sh' on the GPU machine with $(realpath --relative-to="$ROOT" "$DEST" 2>/dev/null || echo "$DEST") carried"
