#!/usr/bin/env bash
# Install everything patchbench needs on a fresh Debian-like machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# Pinned: these releases lie on the machine's disk; an unpinned torch may pull gigabytes.
python3 -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
