#!/usr/bin/env bash
# The README's resume claim on the real demo: the same final val ROC-AUC and weights for a run
# never killed (a), one SIGKILLed after epoch 0's last.ckpt (b) and one SIGKILLed mid-epoch after
# a step checkpoint (c), each resumed with ckpt_path=last. Each run uses its own empty folder.
#   bash benchmarks/resume_demo.sh [WORK_DIR]     (about 5 minutes on 2 CPU cores)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
EX=$ROOT/ex_maest.py
WORK=${1:-$(mktemp -d)}
CKPTS=outputs/demo/train/checkpoints

run_and_kill() {  # run_and_kill DIR FILE ARGS...: start the demo in DIR, SIGKILL it once FILE is written
  local dir=$1 file=$2; shift 2
  (cd "$dir" && exec "$PY" "$EX" -u with demo "$@" > log-killed.txt 2>&1) &
  local pid=$!
  while [ ! -f "$dir/$CKPTS/$file" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "run in $dir ended before $file was written" >&2; exit 1; }
    sleep 0.2
  done
  kill -9 "$pid"; wait "$pid" 2>/dev/null || true
  echo "killed the run in $dir after $file"
}

rm -rf "$WORK"/{a,b,c}; mkdir -p "$WORK"/{a,b,c}
(cd "$WORK/a" && "$PY" "$EX" -u with demo > log.txt 2>&1)
run_and_kill "$WORK/b" last.ckpt
(cd "$WORK/b" && "$PY" "$EX" -u with demo ckpt_path=last > log.txt 2>&1)
run_and_kill "$WORK/c" step-step=50.ckpt checkpoint_every_n_train_steps=25
(cd "$WORK/c" && "$PY" "$EX" -u with demo checkpoint_every_n_train_steps=25 ckpt_path=last > log.txt 2>&1)

"$PY" - "$WORK" <<'PY'
import ast
import re
import sys
from pathlib import Path

import torch

work = Path(sys.argv[1])
for name in "abc":  # Sacred logs the command's result (full-precision metrics) as its last line
    result = re.search(r"Result: (\{.*\})", (work / name / "log.txt").read_text()).group(1)
    metrics = ast.literal_eval(result)["metrics"]
    print(f"{name}: val_roc {metrics['val_roc']!r}  val_roc_swa {metrics['val_roc_swa']!r}  val_loss {metrics['val_loss']!r}")
states = {name: torch.load(work / name / "outputs/demo/train/checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"] for name in "abc"}
for name in "bc":
    diff = max((states["a"][k].float() - states[name][k].float()).abs().max().item() for k in states["a"])
    print(f"largest weight difference a vs {name} (net and net_swa): {diff}")
PY
