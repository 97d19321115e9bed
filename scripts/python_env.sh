#!/usr/bin/env bash
# scripts/python_env.sh: create or update the Python venv of kept's third-party parity tests.
#
#   scripts/python_env.sh [--force] [--recreate]
#
# The venv lives outside the repository, at ${KEPT_VENV:-$HOME/.cache/kept/venv}. It is filled
# from PyPI with tests/python/requirements.txt (pinned torch, transformers, safetensors, numpy,
# sentencepiece, pytest). pip runs only when the requirements file changed since the last
# successful install: a stamp file in the venv records the file's SHA-256.
#
#   --force     run pip even if the stamp says the requirements are installed
#   --recreate  delete the venv first (only a directory that holds a pyvenv.cfg) and rebuild it
#
# Environment:
#   KEPT_VENV        where the venv lives (default $HOME/.cache/kept/venv)
#   KEPT_PYTHON_BIN  interpreter that creates the venv (default python3; needs >= 3.10)
#   KEPT_PIP_ARGS    extra pip arguments, split on spaces (e.g. "--index-url URL" for a mirror)
#
# Logs go to stderr; the last line on stdout is the venv's python, so
#   PY=$(scripts/python_env.sh) && "$PY" -m pytest tests/python
# works. A fresh install downloads torch with its CUDA wheels (a few GB; ~90 s on a fast link).
set -euo pipefail

log() { printf 'python_env.sh: %s\n' "$*" >&2; }
die() {
  printf 'python_env.sh: error: %s\n' "$*" >&2
  exit 1
}

force=0
recreate=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --recreate) recreate=1 ;;
    -h | --help)
      sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    *) die "unknown argument '$arg' (expected --force, --recreate or --help)" ;;
  esac
done

script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd -- "$script_dir/.." && pwd)
requirements="$repo_root/tests/python/requirements.txt"
[[ -f "$requirements" ]] || die "requirements file not found: $requirements"

if [[ -n "${KEPT_VENV:-}" ]]; then
  venv="$KEPT_VENV"
else
  [[ -n "${HOME:-}" ]] || die "neither KEPT_VENV nor HOME is set: cannot choose where the venv goes"
  venv="$HOME/.cache/kept/venv"
fi
case "$venv" in
  /*) ;;
  *) venv="$PWD/$venv" ;;
esac
case "$venv/" in
  "$repo_root"/*) die "the venv must live outside the repository (KEPT_VENV=$venv is inside $repo_root)" ;;
esac

venv_python="$venv/bin/python"
stamp="$venv/.kept-requirements.sha256"

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"
req_hash=$(sha256sum "$requirements" | cut -d' ' -f1)

# One installer at a time for a given venv (ctest -j, two shells): lock a file beside it.
mkdir -p -- "$(dirname -- "$venv")" || die "cannot create $(dirname -- "$venv")"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock" || die "cannot open lock file $venv.lock"
  flock 9 || die "cannot lock $venv.lock"
fi

if ((recreate)) && [[ -e "$venv" ]]; then
  [[ -f "$venv/pyvenv.cfg" ]] ||
    die "--recreate: $venv has no pyvenv.cfg, it does not look like a venv; refusing to delete it"
  log "removing $venv (--recreate)"
  rm -rf -- "$venv"
fi

if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
  die "$venv exists but is not a venv (no pyvenv.cfg); remove it or set KEPT_VENV elsewhere"
fi

if [[ -f "$venv/pyvenv.cfg" ]] && ! "$venv_python" -c 'import sys' >/dev/null 2>&1; then
  die "$venv is a broken venv ($venv_python does not run; was its base interpreter removed?); rerun with --recreate"
fi

if [[ ! -f "$venv/pyvenv.cfg" ]]; then
  base_python="${KEPT_PYTHON_BIN:-python3}"
  command -v "$base_python" >/dev/null 2>&1 ||
    die "interpreter '$base_python' not found; install Python >= 3.10 or set KEPT_PYTHON_BIN"
  "$base_python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "$base_python is Python $("$base_python" -c 'import platform; print(platform.python_version())'); transformers 5 needs >= 3.10 (set KEPT_PYTHON_BIN)"
  "$base_python" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
    die "$base_python lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)"
  log "creating venv $venv with $(command -v "$base_python")"
  "$base_python" -m venv "$venv" || die "python -m venv $venv failed"
fi

if ((force == 0)) && [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$req_hash" ]]; then
  log "requirements already installed (stamp $stamp matches $requirements); use --force to reinstall"
else
  rm -f -- "$stamp"
  pip_args=(--disable-pip-version-check --no-input install -r "$requirements")
  if [[ -n "${KEPT_PIP_ARGS:-}" ]]; then
    read -r -a extra <<<"$KEPT_PIP_ARGS"
    pip_args+=("${extra[@]}")
  fi
  log "pip ${pip_args[*]}"
  "$venv_python" -m pip "${pip_args[@]}" >&2 ||
    die "pip install failed (see above); nothing was stamped, rerun after fixing the cause"
  "$venv_python" -c 'import torch, transformers, safetensors, numpy, pytest' >&2 ||
    die "the packages installed but do not import in $venv_python (see above)"
  tmp_stamp="$stamp.tmp.$$"
  printf '%s\n' "$req_hash" >"$tmp_stamp"
  mv -f -- "$tmp_stamp" "$stamp"
  log "installed; stamp written to $stamp"
fi

printf '%s\n' "$venv_python"
