#!/usr/bin/env bash
# The toy FLUX as committed in toy/base_flux: three runs of toy/build_flux.py on toy/base_many's VAE, about 3 hours
# on 2 cores (each run's settings are in build.json, the earlier runs' under "continued_from").
#     bash toy/build_flux.sh [OUTPUT]        # default toy/base_flux
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-toy/base_flux}
python toy/build_flux.py --steps 3600 --save_every 400 --output "$out"
python toy/build_flux.py --init "$out" --steps 3000 --seed 1 --sigmas logit_normal --save_every 500 --output "$out"
python toy/build_flux.py --init "$out" --steps 4500 --seed 2 --sigmas logit_normal --drop_captions 0.1 --save_every 500 \
    --output "$out"
