#!/usr/bin/env bash
# Convert a whole photo library, resumably.
#
#   examples/batch.sh ~/Pictures/holiday ~/Pictures/holiday-ghibli
#
# - Folders are walked recursively; only files whose *content* is an image are taken, and the
#   sub-folders are mirrored under the output folder.
# - Existing outputs are skipped, so if the run is interrupted (Ctrl-C, a reboot, a killed job),
#   running the same command again picks up where it stopped. Add --overwrite to redo everything.
# - Each photo gets its own seed, derived from --seed and the photo's path inside the folder, so
#   the same photo always gives the same picture whatever else is in the run.
# - A file that fails prints "path: error" and the run goes on; the exit status is then 2.
set -euo pipefail
in=${1:?usage: batch.sh INPUT_DIR OUTPUT_DIR}
out=${2:?usage: batch.sh INPUT_DIR OUTPUT_DIR}

ghiblify "$in" -o "$out" \
  --seed 42 \
  --format jpg \
  --report "$out/report.jsonl"
status=$?

# Only some files may have failed (status 2): list them from the report.
if [ "$status" -eq 2 ]; then
  grep '"status":"failed"' "$out/report.jsonl" || true
fi

# Paths from another tool work too, one per line on stdin:
#   find "$in" -name '*.jpg' -mtime -7 | ghiblify - -o "$out"
