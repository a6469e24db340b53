#!/usr/bin/env bash
# Reproduce the papers' tables: SPD Table 1 (TMS, MMCS / ML2R over seeds), the residual-MLP results
# (1, 2, 3 layers), and the induction-head Table 1 / Figure 2. Writes results/*.md with the
# paper's numbers beside ours.
#
#   bash experiments.sh            # paper settings (GPU strongly advised: resid_mlp3 and induction
#                                  # take days on a CPU)
#   bash experiments.sh --quick    # CPU-sized: fewer seeds and steps, smaller residual MLPs
#
# Every run folder lands in runs/experiments[_quick]/; rerunning skips runs whose metrics.json exists
# and continues killed ones from their last checkpoint (train.py --resume).
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
if (( QUICK )); then  # about 8.4 hours of one CPU thread (measured), plus the targets
  ROOT=runs/experiments_quick; SEEDS_52="0 1"; SEEDS_4010="0"
  TMS_STEPS=20000; TMS_40_STEPS=10000
  RESID_ARGS="--steps 10000"; RESID3_ARGS="--steps 10000 --C 200 --d_gate 32"
  IH_ARGS="--steps 3000 --batch_size 64"; IH_TARGET="--target_steps 3000"
  SUFFIX=_quick
else
  ROOT=runs/experiments; SEEDS_52="0 1 2 3 4"; SEEDS_4010="0 1 2 3 4"
  TMS_STEPS=40000; TMS_40_STEPS=40000
  RESID_ARGS=""; RESID3_ARGS=""
  IH_ARGS=""; IH_TARGET=""
  SUFFIX=""
fi
mkdir -p "$ROOT" results

run() {  # run NAME ARGS...: one decomposition unless it already finished; a killed one is resumed
  local out="$ROOT/$1"; shift
  if [[ -f "$out/metrics.json" ]]; then echo "skip $out (done)"; return; fi
  local resume=()
  if [[ -f "$out/config.json" ]]; then resume=(--resume); fi
  echo "=== python train.py $* --out $out ${resume[*]}"
  python train.py "$@" --out "$out" --no_progress --log_every 1000 "${resume[@]}"
}

# --- SPD paper Table 1: the four TMS models over seeds
for seed in $SEEDS_52; do
  run "tms_5-2_s$seed"      --model tms_5-2      --seed "$seed" --steps "$TMS_STEPS"
  run "tms_5-2-id_s$seed"   --model tms_5-2-id   --seed "$seed" --steps "$TMS_STEPS"
done
for seed in $SEEDS_4010; do
  run "tms_40-10_s$seed"    --model tms_40-10    --seed "$seed" --steps "$TMS_40_STEPS"
  run "tms_40-10-id_s$seed" --model tms_40-10-id --seed "$seed" --steps "$TMS_40_STEPS"
done

# --- SPD paper residual MLPs (Figures 6-13)
run resid_mlp1 --model resid_mlp1 $RESID_ARGS
run resid_mlp2 --model resid_mlp2 $RESID_ARGS
run resid_mlp3 --model resid_mlp3 $RESID3_ARGS

# --- Transformer paper: induction heads, Table 1 and Figure 2
run induction --model induction $IH_ARGS $IH_TARGET

python analysis.py report "$ROOT" --out results --suffix "$SUFFIX"

# --- GPT-2 (transformer paper Figures 3, 4, 9): only where its weights can be loaded
if python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('${GPT2:-gpt2}')" >/dev/null 2>&1; then
  run gpt2 --model gpt2 --pretrained "${GPT2:-gpt2}"
else
  echo "GPT-2 skipped: transformers is not installed or the weights '${GPT2:-gpt2}' cannot be loaded" \
       "(offline? set GPT2=/path/to/local/gpt2 to use a local copy)"
fi
echo "tables written to results/"
