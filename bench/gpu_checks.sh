#!/usr/bin/env bash
# On the GPU box: the device checks of the engine, trainer and app, one after the other, then a summary.
#   bash bench/gpu_checks.sh OUT_DIR
# Both roles run on GPU 0 (gpus.inference = gpus.training = 0) on a one-GPU machine.
set -uo pipefail
out=${1:-/tmp/tandem-gpu}
mkdir -p "$out"
export TANDEM_CACHE=/tmp/tandem-cache PYTHONUNBUFFERED=1
work=$(mktemp -d)
sed -e 's/^training = 1 .*/training = 0/' settings.toml >"$work/settings.toml"
export TANDEM_SETTINGS=$work/settings.toml
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, trl, unsloth; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'unsloth', unsloth.__version__)" 2>&1 | tail -1

echo "== chat through unsloth on the GPU (demo model, 4-bit)"
t=$SECONDS
python3 -m engine.cli chat --once "What is 2+2?" --json >"$out/chat.json" 2>"$out/chat.err"
echo "rc=$? in $((SECONDS - t)) s"; cat "$out/chat.json"; grep -i "error\|4-bit\|loading" "$out/chat.err" | tail -5

echo "== quick_test training on the GPU (unsloth 4-bit + TRL)"
run=$(python3 -m engine.cli train --task math --data data/samples/math.jsonl --profile quick_test --gpu 0 --wait 500 2>"$out/train.err")
echo "run $run: $(tail -1 "$out/train.err")"
cp "$work/logs/runs/$run/metrics.jsonl" "$out/train-metrics.jsonl" 2>/dev/null
tail -20 "$work/logs/runs/$run/output.log" | grep -v "^\s*$" | tail -8
python3 - "$work/logs/runs/$run" <<'PY'
import json, sys
from pathlib import Path
m = [json.loads(x) for x in (Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines()]
steps = [x for x in m if "loss" in x]
if steps:
    last = steps[-1]
    print(f"steps {last['step']}/{last['total']}  loss {steps[0]['loss']:.3f} -> {last['loss']:.3f}  "
          f"{last['samples_per_s'] / 8:.2f} steps/s  {last['tokens_per_s']:.0f} tok/s  peak {last.get('gpu_mem_gb')} GB")
PY
python3 -m engine.cli adapters list

echo "== the app, headless, with real NVML"
python3 bench/tui_check.py "$out/tui.svg" 2>"$out/tui.err" || tail -20 "$out/tui.err"
