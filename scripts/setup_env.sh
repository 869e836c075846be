#!/usr/bin/env bash
# Creates .venv and installs, in order: torch/torchvision, detectron2, fcos-d2 (editable, with the
# test and export extras).
#
# Idempotent: a stamp in .venv records a hash of the inputs that decide what gets installed; when
# it matches and the imports still work, the script returns in seconds.
#
# Environment knobs:
#   PYTHON                      interpreter that creates the venv (default: python3)
#   VENV                        venv folder (default: .venv in the repository root)
#   FCOS_D2_CONSTRAINTS         pip constraints file (default: ci/constraints.txt; set it to an empty
#                               string on a GPU machine to let pip pick your CUDA torch)
#   FCOS_D2_D2_GIT_TIMEOUT      seconds allowed for the official detectron2 git install (default 120)
#   FCOS_D2_SKIP_D2_GIT=1       skip the official git route and go straight to the PyPI fallback
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
CONSTRAINTS="${FCOS_D2_CONSTRAINTS-$ROOT/ci/constraints.txt}"
D2_GIT_URL="git+https://github.com/facebookresearch/detectron2.git"
D2_FALLBACK="sal-detectron2==0.7.2"
STAMP="$VENV/.fcos_d2_setup_stamp"

step_name="start"
on_error() {
    echo "setup_env.sh: FAILED at step '$step_name' (exit $1). Fix the problem above and re-run 'make setup'." >&2
}
trap 'on_error $?' ERR
step() { step_name="$1"; echo "==> [setup] $1"; }

inputs_hash() {
    local files=("$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml")
    [ -n "$CONSTRAINTS" ] && files+=("$CONSTRAINTS")
    { cat "${files[@]}"; echo "constraints=$CONSTRAINTS"; } | sha256sum | cut -d' ' -f1
}

step "check inputs"
if [ -n "$CONSTRAINTS" ] && [ ! -f "$CONSTRAINTS" ]; then
    echo "constraints file FCOS_D2_CONSTRAINTS=$CONSTRAINTS does not exist (set it to '' for none)" >&2
    false
fi

step "create virtualenv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
constraint_args=()
[ -n "$CONSTRAINTS" ] && constraint_args=(-c "$CONSTRAINTS")

want="$(inputs_hash)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && "$PY" -c "import torch, torchvision, detectron2, fvcore, fcos_d2, onnxruntime" 2>/dev/null; then
    echo "==> [setup] .venv is up to date (delete $STAMP to force a reinstall)"
    exit 0
fi

step "check free disk"
# torch's CUDA build (the only one with a torchvision for it) makes a venv of about 6 GiB.
free_gib="$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 { printf "%.1f", $4 / 1048576 }')"
if ! "$PY" -c "import torch" 2>/dev/null && awk -v f="$free_gib" 'BEGIN { exit !(f < 7) }'; then
    echo "    WARNING: $free_gib GiB free under $(dirname "$VENV"); the venv needs about 6 GiB and" \
        "the tests about 1 GiB more. Free some space or set VENV to a folder on a larger disk." >&2
fi

step "upgrade pip"
"${PIP[@]}" install -q --upgrade pip "${constraint_args[@]}"

step "install torch and torchvision"
"${PIP[@]}" install -q "${constraint_args[@]}" torch torchvision

step "install detectron2"
d2_route=""
if "$PY" -c "import detectron2" 2>/dev/null; then
    d2_route="already installed ($("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
elif [ "${FCOS_D2_SKIP_D2_GIT:-0}" != "1" ] \
    && GIT_TERMINAL_PROMPT=0 timeout "${FCOS_D2_D2_GIT_TIMEOUT:-120}" \
        git ls-remote "${D2_GIT_URL#git+}" HEAD >/dev/null 2>&1 \
    && GIT_TERMINAL_PROMPT=0 "${PIP[@]}" install -q --no-build-isolation "${constraint_args[@]}" \
        "detectron2 @ $D2_GIT_URL"; then
    d2_route="official source build from $D2_GIT_URL (compiled C++/CUDA ops)"
else
    echo "    official detectron2 source is unreachable or failed to build; using the PyPI republish $D2_FALLBACK"
    tmp="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 -d "$tmp" "$D2_FALLBACK"
    wheel="$(ls "$tmp"/*.whl)"
    # The wheel is tagged cp310 but only its compiled _C extension is version-specific; detectron2
    # falls back to pure-Python code paths without it, so install it under a universal tag.
    universal="$tmp/$(basename "$wheel" | sed -E 's/-cp3[0-9]+-[a-z0-9_]+-[a-z0-9_]+\.whl$/-py3-none-any.whl/')"
    [ "$wheel" = "$universal" ] || mv "$wheel" "$universal"
    "${PIP[@]}" install -q "${constraint_args[@]}" "$universal" fvcore iopath "numpy<2" "setuptools<81"
    rm -rf "$tmp"
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
    rm -f "$site"/detectron2/_C.cpython-*.so
    d2_route="PyPI republish $D2_FALLBACK (pure Python: no compiled detectron2 ops)"
fi
"$PY" -c "import detectron2" || { echo "detectron2 installed but does not import" >&2; false; }
echo "    detectron2 route: $d2_route"

step "install fcos-d2 (editable) with its test and export extras"
"${PIP[@]}" install -q "${constraint_args[@]}" -e "$ROOT[test,export]"

step "verify imports"
"$PY" - <<'EOF'
import torch, torchvision, detectron2, fcos_d2, onnxruntime
print(f"    torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__}, fcos_d2 {fcos_d2.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
EOF
echo "$want" > "$STAMP"
echo "==> [setup] done"
