#!/usr/bin/env bash
# Issue 13 on a two-GPU box, one command, every process held to 24 GB of its card as on two 24 GB cards:
#   training  at once: `standard` on GPU 0 and `max_quality` on GPU 1, 24-layer GPT-OSS-20B shape, rows of
#             max_seq_length (bench/train_memory.py, ~4 min)
#   starts    alone: first and second start of the chat engine, CUDA contexts per load step (start_times.py,
#             ~3-4 min; it starves when run beside the trainers)
#   two-gpu   chat on GPU 0 while quick_test trains on GPU 1, the new specialist goes live (two_gpu_run.py,
#             ~4 min); extra arguments go to it, e.g. --set model.serve_in_4bit=auto
#   [STEPS="starts two-gpu"] bash bench/gpu_24gb.sh OUT_DIR [two_gpu_run.py options]
# The tables are repeated at the end; full logs in OUT_DIR.
set -uo pipefail
out=${1:-/tmp/tandem-24gb}
shift || true
steps=${STEPS:-training starts two-gpu}
mkdir -p "$out"
export TANDEM_CACHE=${TANDEM_CACHE:-/tmp/tandem-cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}; steps: $steps"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, unsloth; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'unsloth', unsloth.__version__)" 2>&1 | tail -1
t=$SECONDS
if [[ $steps == *training* || $steps == *two-gpu* ]]; then
  CUDA_VISIBLE_DEVICES=1 python3 - <<'PY' 2>&1 | grep -v Warning | tail -1
import tempfile
from pathlib import Path
from bench.shapes import save_slice
from engine.serve.demo_model import demo_model_path
print("24-layer model at", save_slice(Path(tempfile.gettempdir()) / "gpt-oss-20b-slice-24", 24, demo_model_path()))
PY
  echo "== saved in $((SECONDS - t)) s"
fi
if [[ $steps == *training* ]]; then
  t=$SECONDS
  timeout -k 10 280 python3 bench/train_memory.py --gpu 0 --profiles standard --steps 2 >"$out/train-gpu0.txt" 2>&1 &
  timeout -k 10 280 python3 bench/train_memory.py --gpu 1 --profiles max_quality --steps 2 >"$out/train-gpu1.txt" 2>&1 &
  wait
  python3 - <<'PY'  # a trainer outlives a timed-out bench script (its own session): end those it started
import glob, json, os, signal
for f in glob.glob("/tmp/mem-*/logs/runs/*/state.json"):
    s = json.load(open(f))
    if s.get("status") == "running" and s.get("pid"):
        try:
            os.kill(s["pid"], signal.SIGKILL)
            print("ended leftover trainer", s["pid"])
        except ProcessLookupError:
            pass
PY
  echo "== training memory in $((SECONDS - t)) s"
fi
if [[ $steps == *starts* ]]; then
  t=$SECONDS
  timeout -k 10 300 python3 bench/start_times.py --inference-gpu 0 --training-gpu 1 >"$out/starts.txt" 2>&1
  echo "== starts in $((SECONDS - t)) s"
fi
if [[ $steps == *two-gpu* ]]; then
  t=$SECONDS
  timeout -k 10 300 python3 bench/two_gpu_run.py --inference-gpu 0 --training-gpu 1 --layers 24 --cap-gb 24 "$@" \
    >"$out/two-gpu.txt" 2>&1
  echo "== two-GPU run in $((SECONDS - t)) s"
fi
for f in starts train-gpu0 train-gpu1 two-gpu; do  # each table starts after the script's last blank line
  [[ -f $out/$f.txt ]] || continue
  echo "---- $f"
  if grep -q '^RESULT ' "$out/$f.txt"; then tac "$out/$f.txt" | sed '/^$/q' | tac | grep -v '^RESULT '
  else grep -v -i 'warn' "$out/$f.txt" | tail -25; fi
done
