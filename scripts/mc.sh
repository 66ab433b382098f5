#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (pinned, idempotent) and then runs
#   bash scripts/mc.sh reproduce [ARGS...]   the main job (modality-circuits reproduce)
#   bash scripts/mc.sh test [PYTEST ARGS...]  the test suite (what .ci/run calls)
#   bash scripts/mc.sh setup                  only the environment
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1

setup() {
  local stamp_src stamp
  stamp_src=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.mc-stamp" ] && [ "$(cat "$VENV/.mc-stamp")" = "$stamp_src" ]; then
    return 0  # environment already matches setup.cfg: reuse it
  fi
  echo "[mc] setting up $VENV (pinned dependencies from setup.cfg)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch first and pinned: the local CPU wheel. Never torchvision.
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]"
  if "$VENV/bin/pip" show torchvision >/dev/null 2>&1; then
    echo "[mc] torchvision got installed; it pulls a CUDA torch here. Remove it." >&2; exit 1
  fi
  echo "$stamp_src" > "$VENV/.mc-stamp"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup ;;
  reproduce)
    setup
    exec "$VENV/bin/modality-circuits" reproduce "$@" ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/mc.sh {reproduce|test|setup} [args...]" >&2; exit 2 ;;
esac
