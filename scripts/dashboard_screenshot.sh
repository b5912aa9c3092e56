#!/usr/bin/env bash
# docs/ray-dashboard-ppo.png: the Ray dashboard's Actors page during a short PPO run, by headless Chromium
# (Debian's `chromium` package). The run's local cluster has token authentication off (RAY_AUTH_MODE=disabled)
# because Chromium's command line cannot send the token; the roles are listed the same way with it on.
#   scripts/dashboard_screenshot.sh <run_root holding tiny/{data,base,sft,rm}> [out.png]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=$1; out=${2:-docs/ray-dashboard-ppo.png}
export RAY_AUTH_MODE=disabled
.venv/bin/python jobs/ppo.py run_root="$runs" data.root="${CLINICALGPT_DATA_ROOT:-../shared/data}" ppo.steps=12 \
  ppo.eval_every=6 ppo.checkpoint_every=12 ppo.prompts_per_step=8 ppo.samples_per_prompt=4 ppo.minibatch=16 \
  ppo.max_new_tokens=24 ppo.eval_prompts=8 > "$runs/dashboard_screenshot_ppo.log" 2>&1 &
ppo=$!
for _ in $(seq 1 120); do grep -qs '"reward"' "$runs/tiny/ppo/history.jsonl" && break; sleep 2; done
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
  --virtual-time-budget=20000 --screenshot="$out" "http://127.0.0.1:8265/#/actors" 2>/dev/null
wait $ppo
echo "screenshot -> $out"
