#!/usr/bin/env bash
# Smoke test of the whole pipeline on the corpus shipped with the package: no download, no GPU needed.
# Makes or reuses the virtual environment (scripts/setup_env.sh), makes a tokenizer and a tiny dataset,
# runs 10 steps of each family, checks every metrics file, and collects the tables. Everything goes under
# experiments/smoke/; the exit code says pass or fail.
#
#   scripts/test_attention_free_setup.sh          # CPU, tiny shapes
#   scripts/test_attention_free_setup.sh cuda     # GPU 0, the real 0.5B shapes (short context)
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-cpu}
case $target in
  cpu) devices=cpu; preset=tiny; seq_len=64 ;;
  cuda) devices=cuda:0; preset=paper; seq_len=256 ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac
source scripts/setup_env.sh
export EXPERIMENT_DIR=experiments/smoke
rm -rf "$EXPERIMENT_DIR"
mkdir -p "$EXPERIMENT_DIR"

echo "== 1/5 tokenizer and data from the embedded corpus"
corpus=$("$PYTHON" -c 'from training_harness.tokenization import default_corpus_path; print(default_corpus_path())')
"$PYTHON" - "$corpus" "$EXPERIMENT_DIR/tokenizer/tokenizer.json" <<'PY'
import json, sys
from training_harness.tokenization import train_byte_level_tokenizer
texts = [json.loads(line)["text"] for line in open(sys.argv[1])]
train_byte_level_tokenizer(texts, sys.argv[2], vocab_size=512)
PY
scripts/prepare_fineweb_dataset.sh --source "$corpus" --tokenizer "$EXPERIMENT_DIR/tokenizer/tokenizer.json" \
  --output_dir "$EXPERIMENT_DIR/data/tokenizer" --val_fraction 0.2 --workers 1

echo "== 2/5 configs ($preset shapes, context $seq_len)"
scripts/generate_attention_free_configs.sh --sizes 0.5B --preset "$preset" --seq_len "$seq_len" \
  --data_root "$EXPERIMENT_DIR/data" --shared_tokenizer "$EXPERIMENT_DIR/tokenizer/tokenizer.json" \
  --output_dir "$EXPERIMENT_DIR/configs" >/dev/null

echo "== 3/5 10 steps of each family on $devices"
EXTRA_ARGS="--eval_windows 4 --sample_interval_s 0.05" \
  scripts/run_all_attention_free_experiments.sh dsw "$devices" 10

echo "== 4/5 metrics files"
required=ppl,bpb,amu_gb,al_s_per_iter,tt_tokens_per_param_s,tokens_per_s
[[ $target == cuda ]] && required=$required,aec_w,energy_j,peak_memory_gb,mfu
"$PYTHON" -m training_harness.sweep check "$EXPERIMENT_DIR/results" --require "$required"

echo "== 5/5 tables"
"$PYTHON" scripts/collect_attention_free_results.py --results_dir "$EXPERIMENT_DIR/results" \
  --output_dir "$EXPERIMENT_DIR/tables"
echo "smoke test passed; tables in $EXPERIMENT_DIR/tables/ (attention_free_table.tex, .csv, report, plots)"
