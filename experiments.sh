#!/usr/bin/env bash
# Reproduce the papers' tables: SPD Table 1 (TMS, MMCS / ML2R over seeds), the residual-MLP results
# (1, 2, 3 layers), the induction-head Table 1 / Figure 2, APD's Table 1 (the baseline, apd.py) and
# the SPD paper's central claim measured: SPD against APD over their main hyperparameter (TMS 5-2).
# Writes results/*.md with the paper's numbers beside ours.
#
#   bash experiments.sh            # paper settings (GPU strongly advised: resid_mlp3 and induction
#                                  # take days on a CPU)
#   bash experiments.sh --quick    # CPU-sized: fewer seeds and steps, smaller residual MLPs
#   bash experiments.sh [--quick] spd|apd|robustness|clustering    # one part only (clustering: of the spd part's runs)
#
# Every run folder lands in runs/experiments[_quick]/; rerunning skips runs whose metrics.json exists
# and continues killed ones from their last checkpoint (train.py --resume).
set -euo pipefail
cd "$(dirname "$0")"

QUICK=0
[[ "${1:-}" == "--quick" ]] && { QUICK=1; shift; }
PART="${1:-all}"
case "$PART" in all|spd|apd|robustness|clustering) ;; *) echo "unknown part '$PART': use spd, apd, robustness or clustering (or nothing: all)"; exit 1;; esac
if (( QUICK )); then  # about 8.4 hours of one CPU thread (measured), plus the targets
  ROOT=runs/experiments_quick; SEEDS_52="0 1"; SEEDS_4010="0"
  TMS_STEPS=20000; TMS_40_STEPS=10000
  RESID_ARGS="--steps 10000"; RESID3_ARGS="--steps 10000 --C 200 --d_gate 32"
  IH_ARGS="--steps 3000 --batch_size 64"; IH_TARGET="--target_steps 3000"
  SEEDS_APD="0 1 2"; APD_4010_SEEDS="0"
  SWEEP_SPD="--steps 20000 --batch_size 1024"; SWEEP_APD="--steps 10000"  # half of each paper's steps (SPD: a quarter of its batch)
  SEEDS_SWEEP="0 1 2"
  SUFFIX=_quick
else
  ROOT=runs/experiments; SEEDS_52="0 1 2 3 4"; SEEDS_4010="0 1 2 3 4"
  TMS_STEPS=40000; TMS_40_STEPS=40000
  RESID_ARGS=""; RESID3_ARGS=""
  IH_ARGS=""; IH_TARGET=""
  SEEDS_APD="0 1 2"; APD_4010_SEEDS="0 1 2"
  SWEEP_SPD=""; SWEEP_APD=""; SEEDS_SWEEP="0 1 2 3 4 5"
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

record() {  # record DIR NAME: a small record of each finished run in DIR into results/NAME_runs/ (analysis.py
  # record), to commit as runs finish; `python analysis.py report|robustness results/NAME_runs` rebuilds the tables
  python analysis.py record "$1" --out "results/$2${SUFFIX}_runs"
}

if [[ "$PART" == all || "$PART" == spd ]]; then
# --- SPD paper Table 1: the four TMS models over seeds
for seed in $SEEDS_52; do
  run "tms_5-2_s$seed"      --model tms_5-2      --seed "$seed" --steps "$TMS_STEPS"; record "$ROOT" spd
  run "tms_5-2-id_s$seed"   --model tms_5-2-id   --seed "$seed" --steps "$TMS_STEPS"; record "$ROOT" spd
done
for seed in $SEEDS_4010; do
  run "tms_40-10_s$seed"    --model tms_40-10    --seed "$seed" --steps "$TMS_40_STEPS"; record "$ROOT" spd
  run "tms_40-10-id_s$seed" --model tms_40-10-id --seed "$seed" --steps "$TMS_40_STEPS"; record "$ROOT" spd
done

# --- SPD paper residual MLPs (Figures 6-13)
run resid_mlp1 --model resid_mlp1 $RESID_ARGS; record "$ROOT" spd
run resid_mlp2 --model resid_mlp2 $RESID_ARGS; record "$ROOT" spd
run resid_mlp3 --model resid_mlp3 $RESID3_ARGS; record "$ROOT" spd

# --- Transformer paper: induction heads, Table 1 and Figure 2
run induction --model induction $IH_ARGS $IH_TARGET; record "$ROOT" spd

python analysis.py report "$ROOT" --out results --suffix "$SUFFIX"
fi

# --- APD (the baseline, apd.py): its paper's Table 1 (TMS 5-2, 40-10) and the SPD paper's TMS 5-2+ID claim
if [[ "$PART" == all || "$PART" == apd ]]; then
for seed in $SEEDS_APD; do
  run "apd/tms_5-2_s$seed"    --model tms_5-2    --method apd --seed "$seed"
  run "apd/tms_5-2-id_s$seed" --model tms_5-2-id --method apd --seed "$seed"
done
for seed in $APD_4010_SEEDS; do
  run "apd/tms_40-10_s$seed"  --model tms_40-10  --method apd --seed "$seed"
done
python analysis.py apd "$ROOT/apd" --out results --suffix "$SUFFIX"
fi

# --- Robustness to the main hyperparameter, TMS 5-2 (the SPD paper's central claim): SPD over
# importance minimality x {0.1, 0.3, 0.5, 1, 2, 3, 10} of the preset's (0.5 and 2 as APD's outer
# points), APD over batch top-k x {0.5, 0.75, 1, 1.5, 2} of its preset's, 6 seeds each (--quick: 3);
# results/robustness.md and its figure, and a small record of each finished run in
# results/robustness_runs/ (analysis.py record; the table can be rebuilt from those alone)
if [[ "$PART" == all || "$PART" == robustness ]]; then
for seed in $SEEDS_SWEEP; do
  for x in 0.1 0.3 0.5 1 2 3 10; do
    run "robustness/spd_x${x}_s$seed" --model tms_5-2 --seed "$seed" $SWEEP_SPD \
        --importance_minimality "$(python -c "print(f'{$x * 3e-3:.6g}')")"
    record "$ROOT/robustness" robustness
  done
  for x in 0.5 0.75 1 1.5 2; do
    run "robustness/apd_x${x}_s$seed" --model tms_5-2 --method apd --seed "$seed" $SWEEP_APD \
        --topk "$(python -c "print(f'{$x * 0.211:.6g}')")"
    record "$ROOT/robustness" robustness
  done
done
python analysis.py robustness "$ROOT/robustness" --out results --suffix "$SUFFIX"
fi

# --- GPT-2 (transformer paper Figures 3, 4, 9): only where its weights can be loaded
if [[ "$PART" == all || "$PART" == spd ]]; then
if python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('${GPT2:-gpt2}')" >/dev/null 2>&1; then
  run gpt2 --model gpt2 --pretrained "${GPT2:-gpt2}"
else
  echo "GPT-2 skipped: transformers is not installed or the weights '${GPT2:-gpt2}' cannot be loaded" \
       "(offline? set GPT2=/path/to/local/gpt2 to use a local copy)"
fi
fi

# --- Clustering the subcomponents into mechanisms (cluster.py), against the toy models' known ones:
# ARI over alpha, results/clustering.md; the induction run's groups (no known partition) are listed too
if [[ "$PART" == all || "$PART" == clustering ]]; then
done_runs=()
for name in tms_5-2-id_s0 tms_5-2-id_s1 tms_5-2-id_s2 tms_5-2-id_s3 tms_40-10-id_s0 resid_mlp1 resid_mlp2 induction; do
  [[ -f "$ROOT/$name/metrics.json" ]] || { echo "clustering: skip $ROOT/$name (not run)"; continue; }
  [[ "$name" == induction ]] && sweep=() || sweep=(--sweep 0.1 0.3 0.5 0.7 1 1.25 1.5 1.75 2 2.25 2.5 3 4 5 10 20 50)
  python cluster.py "$ROOT/$name" "${sweep[@]}"
  done_runs+=("$ROOT/$name")
done
if (( ${#done_runs[@]} )); then python cluster.py report "${done_runs[@]}" --out "results/clustering$SUFFIX.md"; fi
fi
echo "tables written to results/"
