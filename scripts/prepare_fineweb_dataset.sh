#!/usr/bin/env bash
# Stream (or read locally), tokenize and pack FineWeb-Edu into experiments/data/<tokenizer name>/.
#
#   scripts/prepare_fineweb_dataset.sh                                   # hub, GPT-NeoX-20B tokenizer
#   scripts/prepare_fineweb_dataset.sh --tokenizer Qwen/Qwen2.5-0.5B --max_tokens 2000000000
#   scripts/prepare_fineweb_dataset.sh --source ./sample.jsonl --tokenizer ./tokenizers/gpt-neox-20b
#
# Flags: [--source hub|PATH] [--tokenizer ID_OR_PATH] [--output_dir DIR] [--max_tokens N] [--val_fraction F]
#        [--dataset ID] [--dataset_config NAME] [--split NAME] [--text_field NAME] [--workers N]
set -euo pipefail
cd "$(dirname "$0")/.."
EFFICIENTLLM_PROGRAM=$0 exec "${PYTHON:-python3}" -m training_harness.prepare_data "$@"
