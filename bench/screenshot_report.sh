#!/bin/sh
# Build llama-code's bundle and screenshot its report.html in headless Chromium (a look at what users see).
# Needs the Debian package: apt-get update && apt-get install -y chromium
# Usage (from the repository root): sh bench/screenshot_report.sh [OUT_PNG]   (default /tmp/r.png; not committed)
set -eu
OUT_PNG=${1:-/tmp/r.png}
lmc build ../shared/models/llama-code.onnx --target cortex-a55 --input-shape input_ids=1x256 -o /tmp/rep
chromium --headless --no-sandbox --screenshot="$OUT_PNG" --window-size=1400,1800 file:///tmp/rep/report.html
echo "screenshot: $OUT_PNG"
