#!/usr/bin/env bash
# Put concept photos under Data/concept_image/<name>, verified against the dataset's SHA-256 sums.
#
#   bash get_dataset.sh                         # the seed's concepts (DreamBench: cat2 dog dog6 vase)
#   bash get_dataset.sh backpack teapot         # any DreamBench subject (data/dreambench_classes.csv)
#   bash get_dataset.sh --from ~/dreambooth/dataset   # install from a local copy of the dataset folder
#
# Source: the DreamBooth dataset (Ruiz et al. 2023, CC BY 4.0; photos from Unsplash), folder dataset/ of
# the google/dreambooth repository at a fixed commit. Every file must match data/dreambench_SHA256SUMS;
# a file that does not is not installed. Files already in place with the right sum are skipped, so the
# script can be run again after an interruption.
#
# Options: --from DIR (a local copy: DIR/<subject>/<file>), --dest DIR (default Data/concept_image),
# --sums FILE (default data/dreambench_SHA256SUMS).
set -uo pipefail
cd "$(dirname "$0")"

COMMIT=4f887af7970a06fc0cd3adaa1d0b368547d6a1d0
BASE_URL="https://raw.githubusercontent.com/google/dreambooth/$COMMIT/dataset"
SEED_CONCEPTS=(cat2 dog dog6 flower_1 pet_cat1 vase watercolor wearable_glasses)
FROM=""
DEST="Data/concept_image"
SUMS="data/dreambench_SHA256SUMS"
concepts=()

while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM="${2:?--from needs a folder}"; shift 2 ;;
    --dest) DEST="${2:?--dest needs a folder}"; shift 2 ;;
    --sums) SUMS="${2:?--sums needs a file}"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) concepts+=("$1"); shift ;;
  esac
done
[ ${#concepts[@]} -gt 0 ] || concepts=("${SEED_CONCEPTS[@]}")
[ -f "$SUMS" ] || { echo "error: $SUMS: checksum list not found" >&2; exit 2; }
[ -z "$FROM" ] || [ -d "$FROM" ] || { echo "error: --from $FROM: folder not found" >&2; exit 2; }
[ -n "$FROM" ] || command -v curl >/dev/null || { echo "error: downloading needs curl; or use --from DIR" >&2; exit 2; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

fetch() {  # fetch SUBJECT FILE TARGET: copy or download one file to TARGET
  if [ -n "$FROM" ]; then
    [ -f "$FROM/$1/$2" ] || { echo "  missing in the local copy: $FROM/$1/$2" >&2; return 1; }
    cp "$FROM/$1/$2" "$3"
  else
    local status=0
    curl -fsL --retry 2 --connect-timeout 15 -o "$3" "$BASE_URL/$1/$2" || status=$?
    case $status in
      0) ;;
      5|6|7|28) echo "error: cannot reach $BASE_URL (offline?); copy the dataset by hand and use --from DIR" >&2
                rm -f "$3"; exit 1 ;;
      *) echo "  download failed: $BASE_URL/$1/$2 (curl exit status $status)" >&2; return 1 ;;
    esac
  fi
}

# Folders this run creates, deepest first. Those still empty when it ends (every file of a subject failed its
# checksum, or the download stopped) are removed, so a failed run leaves nothing behind.
created=()
make_folder() {
  local missing=() path=$1
  while [ ! -d "$path" ]; do missing+=("$path"); path=$(dirname "$path"); done
  mkdir -p "$1" && created=("${missing[@]}" "${created[@]}")
}
remove_empty_folders() {
  local folder
  for folder in "${created[@]}"; do rmdir "$folder" 2>/dev/null; done
  return 0
}
trap remove_empty_folders EXIT

installed=(); skipped=(); no_source=(); failed=()
for name in "${concepts[@]}"; do
  entries=$(awk -v s="$name" '{ split($2, p, "/"); if (p[1] == s) print $1, p[2] }' "$SUMS")
  if [ -z "$entries" ]; then
    no_source+=("$name")
    continue
  fi
  make_folder "$DEST/$name" || { echo "error: cannot create $DEST/$name" >&2; exit 1; }
  ok=1; fresh=0
  while read -r sum file; do
    target="$DEST/$name/$file"
    if [ -f "$target" ] && [ "$(sha "$target")" = "$sum" ]; then
      continue
    fi
    tmp=$(mktemp "$DEST/$name/.${file}.XXXXXX")
    if fetch "$name" "$file" "$tmp"; then
      got=$(sha "$tmp")
      if [ "$got" = "$sum" ]; then
        mv "$tmp" "$target"; fresh=$((fresh + 1))
        continue
      fi
      echo "  checksum mismatch for $name/$file: expected $sum, got $got (not installed)" >&2
    fi
    rm -f "$tmp"; ok=0
  done <<< "$entries"
  if [ $ok -eq 0 ]; then failed+=("$name")
  elif [ $fresh -eq 0 ]; then skipped+=("$name")
  else installed+=("$name"); fi
done

[ ${#installed[@]} -eq 0 ] || echo "installed: ${installed[*]} (in $DEST)"
[ ${#skipped[@]} -eq 0 ] || echo "already in place: ${skipped[*]}"
if [ ${#no_source[@]} -gt 0 ]; then
  echo "no public source for: ${no_source[*]}"
  for name in "${no_source[@]}"; do
    echo "  add 3-10 photos of your own to $DEST/$name/ (jpg or png; the subject in full view)"
  done
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: incomplete: ${failed[*]} (run again when the problem above is fixed)" >&2
  exit 1
fi
