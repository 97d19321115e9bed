#!/usr/bin/env bash
# scripts/python_env.sh: create or update the Python venv of kept's third-party parity tests.
#
#   scripts/python_env.sh [--force] [--recreate]
#
# The venv lives outside the repository, at ${KEPT_VENV:-$HOME/.cache/kept/venv}. It is filled
# from PyPI with tests/python/requirements.txt (pinned torch, transformers 5, safetensors, numpy,
# sentencepiece, pytest). A second venv beside it, <venv>-4x, holds the transformers 4.x line
# (tests/python/requirements-4x.txt, installed with --no-deps); a .pth file lets it import the
# main venv's torch, numpy, safetensors, sentencepiece and pytest, so torch is downloaded once.
# pip runs only when a requirements file changed since its last successful install: a stamp file
# in each venv records the file's SHA-256.
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

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

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

# install_requirements VENV REQUIREMENTS CHECK_IMPORTS [pip args...]: pip install -r into VENV
# unless its stamp says this exact file is installed.
install_requirements() {
  local target="$1" file="$2" imports="$3"
  shift 3
  local target_stamp="$target/${stamp_name:-.kept-requirements.sha256}" hash
  hash=$(sha256sum "$file" | cut -d' ' -f1)
  if ((force == 0)) && [[ -f "$target_stamp" ]] && [[ "$(cat "$target_stamp")" == "$hash" ]]; then
    log "requirements already installed (stamp $target_stamp matches $file); use --force to reinstall"
    return
  fi
  rm -f -- "$target_stamp"
  local args=(--disable-pip-version-check --no-input install "$@" -r "$file")
  if [[ -n "${KEPT_PIP_ARGS:-}" ]]; then
    read -r -a extra <<<"$KEPT_PIP_ARGS"
    args+=("${extra[@]}")
  fi
  log "pip ${args[*]} (into $target)"
  "$target/bin/python" -m pip "${args[@]}" >&2 ||
    die "pip install failed (see above); nothing was stamped, rerun after fixing the cause"
  "$target/bin/python" -c "import $imports" >&2 ||
    die "the packages installed but do not import in $target/bin/python (see above)"
  printf '%s\n' "$hash" >"$target_stamp.tmp.$$"
  mv -f -- "$target_stamp.tmp.$$" "$target_stamp"
  log "installed; stamp written to $target_stamp"
}

install_requirements "$venv" "$requirements" "torch, transformers, safetensors, numpy, pytest"
# Header-only packages (tests/python/requirements-headers.txt), without their dependencies.
stamp_name=.kept-requirements-headers.sha256 install_requirements "$venv" \
  "$repo_root/tests/python/requirements-headers.txt" "sys" --no-deps

# The transformers 4.x line: its own site-packages first, then the main venv's (a .pth file).
venv4="$venv-4x"
requirements4="$repo_root/tests/python/requirements-4x.txt"
[[ -f "$requirements4" ]] || die "requirements file not found: $requirements4"
if ((recreate)) && [[ -f "$venv4/pyvenv.cfg" ]]; then
  log "removing $venv4 (--recreate)"
  rm -rf -- "$venv4"
fi
[[ -e "$venv4" && ! -f "$venv4/pyvenv.cfg" ]] &&
  die "$venv4 exists but is not a venv (no pyvenv.cfg); remove it"
if [[ ! -f "$venv4/pyvenv.cfg" ]]; then
  log "creating venv $venv4 (transformers 4.x)"
  "$(readlink -f "$venv_python")" -m venv --without-pip "$venv4" || die "python -m venv $venv4 failed"
fi
main_site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site4=$("$venv4/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$main_site" >"$site4/kept-main-venv.pth"
# pip itself comes from the main venv through the .pth file; --no-deps keeps it from touching
# the main venv's packages.
install_requirements "$venv4" "$requirements4" "transformers, tokenizers, torch, sentencepiece, google.protobuf" \
  --no-deps --target "$site4" --upgrade
"$venv4/bin/python" -c 'import transformers, sys; sys.exit(0 if transformers.__version__.startswith("4.") else 1)' ||
  die "$venv4 does not import transformers 4.x first (check $site4/kept-main-venv.pth)"

printf '%s\n' "$venv_python"
