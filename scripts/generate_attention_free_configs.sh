#!/usr/bin/env bash
# Write one training config per model x size into experiments/attention_free_benchmark/configs/.
#
#   scripts/generate_attention_free_configs.sh                            # 4 families x 3 sizes, paper shapes
#   scripts/generate_attention_free_configs.sh --models qwen,mamba --sizes 0.5B --max_steps 200
#   scripts/generate_attention_free_configs.sh --preset matched --shared_tokenizer EleutherAI/pythia-410m
#
# Flags: --models --sizes --preset --max_steps --seq_len --micro_batch_size --data_root --output_dir
#        --qwen_tokenizer --neox_tokenizer --shared_tokenizer   (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
EFFICIENTLLM_PROGRAM=$0 exec "${PYTHON:-python3}" -m training_harness.sweep generate "$@"
