#!/usr/bin/env bash
# The richer world's base model as committed in toy/base_many: three runs of toy/build_base.py, about 2.2 hours
# on 2 cores (each run's settings are in build.json, the earlier runs' under "continued_from").
#     bash toy/build_many.sh [OUTPUT]        # default toy/base_many
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-toy/base_many}
python toy/build_base.py --world many --steps 1400 --output "$out"
python toy/build_base.py --world many --init "$out" --steps 2400 --seed 1 --min_snr 5 --output "$out"
python toy/build_base.py --world many --init "$out" --steps 1800 --seed 2 --lr 3e-4 --min_snr 5 --output "$out"
