#!/usr/bin/env bash
# Render a report headless with Debian's chromium and save a PNG screenshot of the page.
#
#   scripts/screenshot_report.sh RUN_DIR/report/report.html [OUT.png] [WIDTHxHEIGHT]
#
# Default output: report.png beside the HTML; default window 1400x3000. Needs `chromium`
# (apt-get install -y chromium). Used to look at the plots and for docs/report.png.
set -euo pipefail
html="${1:?usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]}"
out="${2:-$(dirname "$html")/report.png}"
size="${3:-1400x3000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "chromium not found: apt-get install -y chromium" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
abs="$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$out_abs" "file://$abs" >/dev/null 2>&1
test -s "$out_abs" || { echo "no screenshot written" >&2; exit 1; }
echo "$out_abs"
