#!/usr/bin/env bash
# Unsloth 2026.10.9 and the versions it pins, installed into their own folder DIR for `peers.py --unsloth-site DIR`.
# Its pins (transformers<=5.17, trl<=1.15, datasets<5, and transformers 5.17's huggingface-hub<2) clash with the
# project's, so they go beside the project's environment, never into it. The tokenizers, torch, peft and
# bitsandbytes it imports are the environment's. Further arguments go to pip, e.g. offline from carried wheels:
#     bash benchmarks/unsloth_site.sh /tmp/unsloth_site --no-index --find-links .whl/unsloth
set -euo pipefail
site=${1:?usage: unsloth_site.sh DIR [pip arguments]}
shift
python3 -m pip install -q --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@" \
    -r "$(dirname "$0")/unsloth_requirements.txt"
rm -rf "$site/studio"  # Unsloth's web app, 80 MB that training never imports
