#!/usr/bin/env bash
# Create the virtual environments that the foreign-exporter scripts run in (tensorflow and
# jax fight torch over protobuf/numpy, so they never go into the main environment).
#
#   bash models/foreign/make_envs.sh [tf|jax|paddle ...]      # default: all three
#
# Venvs go under $SPA_VENV_DIR (default $HOME/.cache/spa-venvs):
#   tf/   tensorflow-cpu + tf2onnx (+ onnxruntime to check the conversion; run keras_cnn.py)
#   jax/  jax[cpu] + flax + jax2onnx      (run jax_models.py)
#   paddle/ paddlepaddle + paddle2onnx    (run paddle_cnn.py; paddle2onnx pins onnx<=1.17)
# An env is (re)built only when its stamp file is missing or its pinned set changed.
# Base interpreter: $SPA_VENV_PYTHON, else python3.11, else python3 (jax2onnx needs >= 3.11).
# Versions are pinned to a set that installs together (checked 2026-11 on CPython 3.11).
set -euo pipefail

VENV_DIR="${SPA_VENV_DIR:-$HOME/.cache/spa-venvs}"
PY="${SPA_VENV_PYTHON:-$(command -v python3.11 || command -v python3)}"

TF_PKGS=(tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnxruntime==1.31.1)
# polygraphy (paddle2onnx's optimiser) pip-installs onnx_graphsurgeon and sympy at run time if missing
PADDLE_PKGS=(paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnxruntime==1.31.1 onnx_graphsurgeon==0.6.1 sympy==1.14.0)
JAX_PKGS=("jax[cpu]==0.10.2" flax==0.12.8 jax2onnx==0.17.1)

make_env() {  # name pkgs...
    local name="$1"; shift
    local dir="$VENV_DIR/$name" want="$*"
    if [[ -f "$dir/.spa-stamp" && "$(cat "$dir/.spa-stamp")" == "$want" ]]; then
        echo "[make_envs] $name: up to date ($dir)"; return 0
    fi
    echo "[make_envs] $name: creating $dir with $PY: $want"
    rm -rf "$dir"
    mkdir -p "$VENV_DIR"
    "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q "$@"
    "$dir/bin/python" -m pip freeze > "$dir/.spa-freeze.txt"
    echo "$want" > "$dir/.spa-stamp"
    echo "[make_envs] $name: done"
}

targets=("$@"); [[ ${#targets[@]} -eq 0 ]] && targets=(tf jax paddle)
for t in "${targets[@]}"; do
    case "$t" in
        tf)  make_env tf "${TF_PKGS[@]}" ;;
        jax) make_env jax "${JAX_PKGS[@]}" ;;
        paddle) make_env paddle "${PADDLE_PKGS[@]}" ;;
        *) echo "unknown env $t (tf|jax|paddle)" >&2; exit 2 ;;
    esac
done
