#!/usr/bin/env bash
# Set up everything (scripts/setup.sh --test) and run the whole test suite.
# Named datasets are read from $TIGHTROPE_DATA_DIR, by default ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
if [ -z "${TIGHTROPE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export TIGHTROPE_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
