#!/usr/bin/env bash
# Trains the whole Shapes-world unCLIP stack in order (CLIP first: the prior and
# the decoder read its export) and assembles the inference checkpoint sample.py uses.
#
#   scripts/train_shapes_demo.sh                      # under 4 h on a 2-core CPU
#   scripts/train_shapes_demo.sh tiny /tmp/runs /tmp/demo   # two steps per stage (a smoke test)
#
# Arguments: [full|tiny] [RUNS_DIR=runs/shapes] [CHECKPOINT=assets/shapes_demo].
# An interrupted run resumes: each stage continues from its last checkpoint,
# and a finished stage only re-exports.
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-full}"
runs="${2:-runs/shapes}"
out="${3:-assets/shapes_demo}"
suffix=""
[[ "$size" == "tiny" ]] && suffix=",tiny"
for stage in clip prior ar_prior decoder sr1 sr2; do
  args=(--config "configs/shapes.py:${stage}${suffix}" --workdir "$runs/$stage")
  if [[ "$stage" == prior || "$stage" == ar_prior || "$stage" == decoder ]]; then  # they read the CLIP's export
    args+=(--config.clip_dir="$runs/clip/export")
  fi
  python train.py "${args[@]}"
done
python - "$runs" "$out" <<'PY'
import sys
from configs import shapes
from unclip_jax import pipeline
runs, out = sys.argv[1:]
print(pipeline.assemble(out, options=shapes.SAMPLING_OPTIONS, param_dtype="float16",
                        **{s: f"{runs}/{s}/export" for s in ("clip", "prior", "ar_prior", "decoder", "sr1", "sr2")}))
PY
