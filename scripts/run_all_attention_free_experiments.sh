#!/usr/bin/env bash
# Run every config of the sweep, each in a process of its own; rerunning skips completed runs.
# Modes: dsw, one node (one GPU, or several under torchrun); dlc, a multi-node cluster job.
#
#   scripts/run_all_attention_free_experiments.sh dsw cuda:0 250              # one GPU
#   scripts/run_all_attention_free_experiments.sh dsw cuda:0,1,2,3 250 qwen   # 4 GPUs, configs matching "qwen"
#   scripts/run_all_attention_free_experiments.sh dsw cpu 10                   # CPU (tiny configs only)
#   scripts/run_all_attention_free_experiments.sh dlc cuda:0,1,2,3,4,5,6,7 250
#       # multi-node: every node runs this on a shared EXPERIMENT_DIR; the cluster sets MASTER_ADDR,
#       # MASTER_PORT and NNODES (or WORLD_SIZE = node count) and NODE_RANK (or RANK = node index);
#       # node 0 locks, records and reports; scripts/slurm/run_attention_free.sbatch does it under Slurm
#
# Environment: EXPERIMENT_DIR (default experiments/attention_free_benchmark) holding configs/, results/, logs/;
# PYTHON (default python3); EXTRA_ARGS, flags appended to every training command.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {  # the header comment above, then the synopsis; to stderr with exit 2 after a mistake
  local code=${1:-2}
  {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo "usage: $0 <dsw|dlc> <cpu|cuda:N[,M...]> <max_steps> [config-name filters...]"
  } >&"$(( code == 0 ? 1 : 2 ))"
  exit "$code"
}
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
[[ $# -ge 3 ]] || usage
mode=$1; devices=$2; max_steps=$3; shift 3
filters=("$@")
[[ $mode == dsw || $mode == dlc ]] || { echo "error: mode must be dsw or dlc, not '$mode'" >&2; usage; }
[[ $max_steps =~ ^[1-9][0-9]*$ ]] || { echo "error: max_steps must be a positive integer, not '$max_steps'" >&2; usage; }

PYTHON=${PYTHON:-python3}
EXPERIMENT_DIR=${EXPERIMENT_DIR:-experiments/attention_free_benchmark}
config_dir=$EXPERIMENT_DIR/configs
results_root=$EXPERIMENT_DIR/results
log_dir=$EXPERIMENT_DIR/logs

# The launcher: plain python on one device, torchrun for several or for a multi-node job (on CPU, one
# process per node: a rehearsal of the multi-node path with gloo).
if [[ $devices == cpu ]]; then
  count=1; device_flag=cpu
elif [[ $devices =~ ^cuda:([0-9]+(,[0-9]+)*)$ ]]; then
  export CUDA_VISIBLE_DEVICES=${BASH_REMATCH[1]}
  count=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | wc -l)
  device_flag=cuda
else
  echo "error: devices must be cpu or cuda:N[,M...], not '$devices'" >&2; usage
fi
node_rank=0
if [[ $mode == dlc ]]; then
  nnodes=${NNODES:-${WORLD_SIZE:?dlc needs NNODES or WORLD_SIZE (node count)}}
  node_rank=${NODE_RANK:-${RANK:?dlc needs NODE_RANK or RANK (node index)}}
  launcher=("$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank"
            --nproc_per_node "$count" --master_addr "${MASTER_ADDR:?dlc needs MASTER_ADDR}"
            --master_port "${MASTER_PORT:?dlc needs MASTER_PORT}")
elif [[ $count -gt 1 ]]; then
  launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$count")
else
  launcher=("$PYTHON")
fi

# Several sweeps may share one experiment folder (one per GPU, say): each run is locked while its sweep
# trains it, and another sweep skips it. A lock dies with its holder; its file names the holder.
lock_dir=$EXPERIMENT_DIR/locks
mkdir -p "$results_root" "$log_dir" "$lock_dir"

# Ctrl-C or SIGTERM: the current run saves its checkpoint and stops, then the sweep stops (exit 130); a
# second one stops the run at once. The run gets its own session, so only this handler signals it.
stop=0
child=
on_signal() {
  stop=1
  [[ -z $child ]] || kill -INT "$child" 2>/dev/null || true
}
trap on_signal INT TERM
shopt -s nullglob
configs=("$config_dir"/*.json)
[[ ${#configs[@]} -gt 0 ]] || { echo "error: no configs in $config_dir; run scripts/generate_attention_free_configs.sh" >&2; exit 2; }

summary=()
failed=0
for config in "${configs[@]}"; do
  [[ $stop == 0 ]] || break
  name=$(basename "$config" .json)
  if [[ ${#filters[@]} -gt 0 ]]; then
    match=0
    for filter in "${filters[@]}"; do [[ $name == *"$filter"* ]] && match=1; done
    [[ $match == 1 ]] || continue
  fi
  results=$results_root/$name
  log=$log_dir/$name.log
  if [[ $node_rank == 0 ]]; then  # a multi-node job's other nodes follow node 0: it alone locks and records
    lock=$lock_dir/$name.lock
    exec 9>>"$lock"
    if ! flock -n 9; then
      summary+=("$name: skipped (in use by $(cat "$lock" 2>/dev/null || echo 'another sweep'))")
      exec 9>&-
      continue
    fi
    echo "PID $$ on $(hostname)" >"$lock"
  else
    log=$log_dir/$name.node$node_rank.log
  fi
  if [[ $("$PYTHON" -m training_harness.sweep status "$results" "$max_steps") == completed ]]; then
    summary+=("$name: skipped (already completed)")
    exec 9>&-
    continue
  fi
  if ! model=$("$PYTHON" -m training_harness.sweep model "$config" 2>>"$log"); then
    [[ $node_rank != 0 ]] || "$PYTHON" -m training_harness.sweep record-crash "$results" "$name" 2 "$log" >/dev/null
    summary+=("$name: failed (unreadable config; see $log)")
    failed=$((failed + 1))
    continue
  fi
  # a signal that came during the checks above was handled only once they had finished: start nothing
  [[ $stop == 0 ]] || { exec 9>&-; break; }
  echo "== $name ($(date -u +%FT%TZ)) -> $log"
  echo "== $name $(date -u +%FT%TZ) ${launcher[*]} -m training_harness.cli $model --config $config" >>"$log"
  set +e
  # shellcheck disable=SC2086 # EXTRA_ARGS is a list of flags
  setsid "${launcher[@]}" -m training_harness.cli "$model" --config "$config" --output_dir "$results" \
    --max_steps "$max_steps" --device "$device_flag" --resume ${EXTRA_ARGS:-} >>"$log" 2>&1 &
  child=$!
  while true; do  # a handled signal ends wait early: wait again until the run has exited
    wait "$child"
    code=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=
  set -e
  cause=  # a failed run's error in one line, so the summary says why
  [[ $code == 0 || $node_rank != 0 ]] || cause=$("$PYTHON" -m training_harness.sweep record-crash "$results" "$name" "$code" "$log")
  status=$("$PYTHON" -m training_harness.sweep status "$results" "$max_steps")
  summary+=("$name: $status (exit $code)${cause:+: $cause}")
  exec 9>&-
  [[ $code == 0 || $status == interrupted ]] || failed=$((failed + 1))
done

echo "== summary ($EXPERIMENT_DIR)"
printf '%s\n' "${summary[@]}"
[[ $stop == 0 ]] || { echo "stopped by a signal; rerun the same command to resume" >&2; exit 130; }
[[ $failed == 0 ]] || { echo "$failed run(s) failed; see $log_dir" >&2; exit 1; }
