#!/usr/bin/env bash
# The accelerator check of docs/performance.md, in one short call (about 10 minutes on one
# H100/H200-class GPU). Needs JAX for the accelerator (pip install "jax[cuda12]==0.10.2") and
# the Kaggle zip; writes its logs and JSON lines to OUT (default: $OUT or ./gpu_check).
#
#   DATASET=/path/to/alzheimer-mri-dataset.zip bash benchmarks/gpu_check.sh
#
# 1. The four reference steps (batch 32, 3 x 128 x 128): float32 and bfloat16.
# 2. One pretraining epoch and one supervised epoch of the `full` preset through the real
#    train_and_evaluate path (end-to-end images/s, step-only images/s, compile seconds).
# 3. With the time left (BUDGET_S, default 300 s): the `full` baseline under the reference
#    protocol on all labels, epoch after epoch, with its test accuracy per epoch
#    (does the full model reach the reference's 98.1 %?).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
DATASET=${DATASET:-../shared/data/alzheimer-mri-dataset.zip}
BUDGET_S=${BUDGET_S:-300}
PEAK=${PEAK:-989e12}  # Dense bf16 peak of an H100/H200 SXM (float32 runs as TF32: half of it).
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import jax; print(jax.devices())" > "$OUT/devices.txt" 2>&1

for dtype in float32 bfloat16; do
  for args in "" "--mode=baseline" "--model=resnet18" "--mode=baseline --model=resnet18"; do
    name=$(echo "step_${dtype} ${args}" | tr ' =-' '___')
    python benchmarks/throughput.py $args --dtype=$dtype --peak_flops=$PEAK \
      --warmup_steps=3 --steps=20 --window=5 > "$OUT/$name.log" 2>&1
    tail -n 1 "$OUT/$name.log" >> "$OUT/steps.jsonl"
  done
done

for mode in pretrain baseline; do
  python benchmarks/train_run.py --preset=full --mode=$mode --epochs=1 \
    --dataset_path="$DATASET" > "$OUT/epoch_$mode.log" 2>&1
  tail -n 1 "$OUT/epoch_$mode.log" >> "$OUT/epochs.jsonl"
done

# The reference protocol's baseline: slice split, no validation carve-out, test checked
# every epoch and the best test epoch kept (sweep_plan.PROTOCOLS['reference']).
timeout "$BUDGET_S" python main.py --config=configs/baseline.py \
  --config.dataset_path="$DATASET" --config.split_scheme=slice --config.val_fraction=0.0 \
  --config.selection_split=test --config.selection_metric=accuracy \
  --config.class_weights=none --config.num_epochs=100 --config.eval_every_epochs=1 \
  --workdir="$OUT/reference_baseline" > "$OUT/reference_baseline.log" 2>&1
python - "$OUT/reference_baseline" > "$OUT/reference_baseline_test_accuracy.txt" <<'EOF'
import glob, sys
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf
events = event_accumulator.EventAccumulator(glob.glob(sys.argv[1] + '/events*')[0],
                                            size_guidance={'tensors': 0})
events.Reload()
for event in events.Tensors('test/accuracy'):
  print(event.step, float(tf.make_ndarray(event.tensor_proto)))
EOF
cat "$OUT/reference_baseline_test_accuracy.txt"
