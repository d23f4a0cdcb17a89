# Body shared by single_node.sbatch and multi_node.sbatch; sourced by them, not submitted.
# Expects the DISTDET_* variables those scripts set, and the training arguments as "$@".
# The per-node `accelerate launch` command is built by `python -m distdet.launch.slurm`.
set -euo pipefail

export PYTHONPATH="$DISTDET_ROOT${PYTHONPATH:+:$PYTHONPATH}"
launch_options=()
[[ -n "$DISTDET_CPU_PROCS" ]] && launch_options+=(--cpu-procs "$DISTDET_CPU_PROCS")
[[ -n "$DISTDET_MIXED_PRECISION" ]] && launch_options+=(--mixed-precision "$DISTDET_MIXED_PRECISION")
# --output-dir and --resume come first so that the same flags in "$@" win.
train=("$DISTDET_TRAIN_SCRIPT" --output-dir "$DISTDET_OUTPUT_DIR" --resume auto "$@")

if [[ "$DISTDET_DRY_RUN" == 1 ]]; then
    exec "$DISTDET_PYTHON" -m distdet.launch.slurm "${launch_options[@]}" --dry-run --all-nodes "${train[@]}"
fi

log_dir="$DISTDET_OUTPUT_DIR/logs"
mkdir -p "$log_dir"
echo "distdet: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST; logs in $log_dir"
exec >>"$log_dir/batch.log" 2>&1
echo "=== $(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s) $SLURM_JOB_NODELIST"

step_options=(--nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
              --output="$log_dir/node%n.log" --open-mode=append)
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && step_options+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# The step runs in the background so that this shell can react to signals while it waits.
# SIGUSR1 to this shell (`--signal=B:USR1@...`, `scancel --batch --signal=USR1`) is passed on to
# the step; SIGTERM (preemption, requeue) is left to the step, and this shell keeps waiting
# for the training processes to save their checkpoint and exit.
interrupted=0
trap 'interrupted=1; echo "$(date -Is) batch shell: SIGUSR1, passing it to the step"; scancel --signal=USR1 "$SLURM_JOB_ID" || true' USR1
trap 'interrupted=1; echo "$(date -Is) batch shell: SIGTERM, waiting for the step to finish"' TERM
srun "${step_options[@]}" "$DISTDET_PYTHON" -m distdet.launch.slurm "${launch_options[@]}" "${train[@]}" &
step=$!
while true; do
    interrupted=0
    status=0
    wait "$step" || status=$?
    (( interrupted )) || break
done
echo "=== $(date -Is) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: step exited with status $status"
exit "$status"
