# shellcheck shell=bash
# Shared shell for the sbatch scripts in launch/; they source it from the repository root. Not run on its own.
#
# The one place for: the repository and Python environment a job uses, the rendezvous address and port taken from
# the allocation, the NCCL / collective settings and timeouts, where logs go, and the requeue-on-warning logic.
#
# Signals, and why the launchers ignore SIGUSR1
#   Slurm delivers a step's signals to every process of the step: srun -> bash -> the `deepspeed` runner ->
#   deepspeed.launcher.launch -> the training ranks (and their data-loader workers). Neither launcher handles SIGUSR1,
#   whose default action is to terminate, so the per-node wrapper sets it to "ignored" before it starts the runner.
#   An ignored signal stays ignored across fork and exec, so the ranks start with it ignored too (a warning during
#   model loading is dropped, not fatal; it is re-sent, see STOP_RESEND_S) until the trainer installs its handler.
#   The runner also ignores SIGTERM so that it cannot die before deepspeed.launcher.launch, which on SIGTERM
#   forwards it to the ranks and gives them 30 s before killing them; the trainer checkpoints in that time.
#
#   SIGUSR1 = "checkpoint, then requeue me": Slurm sends it to the batch shell (#SBATCH --signal=B:USR1@SECONDS);
#             the shell forwards it to the training step, waits, and requeues the job with `scontrol requeue`
#             unless the run has finished. The requeued job runs the same script with the same arguments and the
#             trainer resumes from the newest checkpoint that has a COMPLETE marker.
#   SIGTERM = "checkpoint, then stop": the ranks checkpoint within KillWait when it reaches only the steps
#             (scancel --signal=TERM). The shell does not requeue: a user's scancel must stop the job, and
#             preemption with PreemptMode=REQUEUE is requeued by Slurm itself. When SIGTERM reaches the batch shell
#             too (plain scancel, the hard time limit), srun kills the step at once; hence the early warning.
#
# No silent hangs
#   Uneven data cannot leave a collective waiting: every rank's sample stream is infinite (sharded webdataset
#   readers that cycle), and the trainer, not the data, decides the number of steps, so all ranks run the same
#   steps and meet at every all-reduce. A rank that dies takes the job down within seconds: its launcher sees the
#   non-zero exit and stops the node's other ranks, its srun task fails and --kill-on-bad-exit=1 ends every node.
#   A rank that hangs without dying is caught by the process-group timeout (600 s, set in
#   pipeline/training/distributed.py) together with TORCH_NCCL_ASYNC_ERROR_HANDLING below.
#
# Environment read here (all optional):
#   PIPELINE_ROOT      repository to run from [the submission directory, $SLURM_SUBMIT_DIR]
#   PIPELINE_VENV      Python environment [$PIPELINE_ROOT/.venv]; not activated if it does not exist
#   GPUS_PER_NODE      training processes per node [GPUs Slurm gave the job on a node; 1 where there are none]
#   MASTER_PORT        rendezvous port [15000 + job id mod 15000: below the ephemeral range, kept across requeues]
#   STOP_RESEND_S      re-send the stop warning to the ranks this often until they exit [60]
#   MAX_REQUEUES       give up after this many restarts [50]

# -- the job's environment ---------------------------------------------------------------------------------------

die() {
    echo "${SLURM_JOB_NAME:-$(basename "${BASH_SOURCE[-1]}")}: $*" >&2
    exit 2
}

log() {
    local job=${SLURM_JOB_ID:-nojob}
    [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] || job=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
    echo "[$(date +%H:%M:%S) $job] $*"
}

# Enter the repository and its Python environment. Slurm runs a copy of the batch script from its spool
# directory, so the script's own path says nothing about where the repository is: submit from the repository root.
enter_repository() {
    PIPELINE_ROOT=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$PIPELINE_ROOT" || die "cannot cd to PIPELINE_ROOT=$PIPELINE_ROOT"
    [[ -f launch/common.sh && -d pipeline ]] || die "$PIPELINE_ROOT is not the repository root; submit with" \
        "'sbatch launch/<script>.sbatch ...' from the repository root or set PIPELINE_ROOT"
    PIPELINE_VENV=${PIPELINE_VENV:-$PIPELINE_ROOT/.venv}
    if [[ -x $PIPELINE_VENV/bin/python ]]; then
        export VIRTUAL_ENV=$PIPELINE_VENV PATH=$PIPELINE_VENV/bin:$PATH
    fi
    export PIPELINE_ROOT PYTHONPATH=$PIPELINE_ROOT${PYTHONPATH:+:$PYTHONPATH}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PIPELINE_ROOT/.cache/torch_extensions}
    export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
}

# Collective and NCCL settings. Values already in the environment win, so a cluster can override them in its
# module files or at submission (sbatch --export=ALL,NCCL_SOCKET_IFNAME=ib0 ...).
collective_settings() {
    # A failed or timed-out NCCL collective aborts the rank instead of blocking forever; the process group's
    # timeout (600 s, pipeline/training/distributed.py) is what "timed out" means. Both names: torch renamed it.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Interfaces: leave unset to let NCCL and gloo pick; set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (e.g. ib0,
    # eth0) where nodes have several networks and the default route is not the fast one. InfiniBand settings
    # (NCCL_IB_HCA, NCCL_IB_GID_INDEX) are cluster specific and belong in the cluster's environment.
}

# MASTER_ADDR: the first node of the allocation as the network knows it (its NodeAddr); MASTER_PORT from the job id.
rendezvous_from_allocation() {
    local first
    mapfile -t LAUNCH_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    first=${LAUNCH_NODES[0]}
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(scontrol -o show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
        MASTER_ADDR=${MASTER_ADDR:-$first}
    fi
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    export MASTER_ADDR MASTER_PORT
    export LAUNCH_NODE_LIST="${LAUNCH_NODES[*]}"
}

gpus_per_node() {
    local count=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $count ]]; then
        count=$(nvidia-smi -L 2> /dev/null | wc -l || true)
    fi
    [[ ${count:-0} -gt 0 ]] || count=1
    echo "$count"
}

# Everything above, plus a header in the job log. Call once at the top of a batch script.
job_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit with sbatch (launch/stage1_local.sh runs" \
        "one node without Slurm)"
    enter_repository
    collective_settings
    rendezvous_from_allocation
    GPUS_PER_NODE=$(gpus_per_node)
    export GPUS_PER_NODE
    log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0} on ${LAUNCH_NODE_LIST// /,}:" \
        "${#LAUNCH_NODES[@]} nodes x $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT"
}

# The run directory a training config resolves to (and a config error before any node is touched).
resolve_run_dir() {
    python - "$@" << 'EOF'
import sys

from pipeline.config import ConfigError, load_config

try:
    print(load_config(sys.argv[1], sys.argv[2:]).run_dir)
except (ConfigError, OSError) as err:
    sys.exit(f"error: {err}")
EOF
}

# -- the training step -------------------------------------------------------------------------------------------

# srun runs this once per node (see training_step): one deepspeed launcher that starts GPUS_PER_NODE ranks, without
# ssh or pdsh. The hostfile only tells the launcher the node order and slot count; --no_ssh makes it start this
# node's ranks only, numbered from --node_rank. SIGUSR1 and SIGTERM are ignored from here down (see the top).
deepspeed_on_this_node() {
    local hostfile node status=0
    trap '' USR1 TERM
    hostfile=$(mktemp "${TMPDIR:-/tmp}/hostfile.${SLURM_JOB_ID}.XXXXXX")
    for node in $LAUNCH_NODE_LIST; do
        echo "$node slots=$GPUS_PER_NODE"
    done > "$hostfile"
    deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
        --num_nodes "$(wc -w <<< "$LAUNCH_NODE_LIST")" --num_gpus "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@" || status=$?
    rm -f "$hostfile"
    return "$status"
}

# Run a training module on every node of the allocation through the deepspeed launcher, and requeue on the warning:
#   training_step RUN_DIR DONE_FILE MODULE ARGS...
# RUN_DIR is where the module checkpoints (RUN_DIR/checkpoints/latest names the newest complete checkpoint);
# DONE_FILE is what the module writes only once the run has reached its end. On the warning the ranks get SIGUSR1,
# checkpoint and exit 0; the job is then requeued unless DONE_FILE exists. Exits with the step's status.
training_step() {
    local done_file=$2 module=$3
    TRAINING_RUN_DIR=$1
    shift 3
    run_step stop_training \
        srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        --kill-on-bad-exit=1 --label \
        bash -c 'source launch/common.sh && deepspeed_on_this_node "$@"' deepspeed_on_this_node \
        --module "$module" "$@"
    if [[ $STOP_REQUEST == USR1 ]]; then
        if [[ -e $done_file ]]; then
            log "the warning came after the run had finished ($done_file exists); not requeueing"
        else
            ((STEP_STATUS == 0)) || log "the step failed while stopping (status $STEP_STATUS); the requeued job" \
                "resumes from the newest complete checkpoint"
            requeue_job
        fi
    fi
    exit "$STEP_STATUS"
}

# Run a step whose work survives being killed (it skips what it finished before: img2dataset's incremental mode,
# the feature cache's finished shards) and requeue the job at once on the warning:
#   restartable_step COMMAND...
# Exits with the step's status.
restartable_step() {
    run_step requeue_job "$@"
    exit "$STEP_STATUS"
}

# -- stop warning and requeue ------------------------------------------------------------------------------------

# Run COMMAND in the background so that the batch shell's traps run while it does (bash runs a trap only between
# commands, and `wait` returns early on a trapped signal). On the first SIGUSR1, call ON_WARNING with the step's pid.
# Sets STEP_STATUS (the step's exit status) and STOP_REQUEST (USR1, TERM or empty).
#   run_step ON_WARNING COMMAND...
run_step() {
    local on_warning=$1
    shift
    STOP_REQUEST=""
    trap 'STOP_REQUEST=USR1' USR1
    trap 'STOP_REQUEST=${STOP_REQUEST:-TERM}' TERM
    "$@" &
    local step_pid=$! warned=0
    while :; do
        STEP_STATUS=0
        wait "$step_pid" || STEP_STATUS=$?
        if [[ $STOP_REQUEST == USR1 && $warned == 0 ]] && kill -0 "$step_pid" 2> /dev/null; then
            warned=1
            "$on_warning" "$step_pid"
        fi
        kill -0 "$step_pid" 2> /dev/null || break
    done
    # If a signal interrupted `wait` just as the step ended, this collects the step's own status.
    if ((STEP_STATUS > 128)); then
        local again=0
        wait "$step_pid" 2> /dev/null || again=$?
        ((again == 127)) || STEP_STATUS=$again
    fi
    trap - USR1 TERM
    log "step exited with status $STEP_STATUS${STOP_REQUEST:+ after SIG$STOP_REQUEST}"
}

# The warning for a training step: forward SIGUSR1 to every process of the step (srun forwards it to the tasks).
# A rank ignores SIGUSR1 until the trainer has installed its handler (see the top of this file), so a warning that
# lands during start-up would be lost: re-send it every STOP_RESEND_S seconds until a new checkpoint is complete (the
# `latest` pointer changes), which shows the trainer acted on it. Not after that: a rank that has left its training
# loop no longer handles the signal.
stop_training() {
    local step_pid=$1 latest=$TRAINING_RUN_DIR/checkpoints/latest before
    before=$(cat "$latest" 2> /dev/null || true)
    log "stop warning: forwarding SIGUSR1 to the training step"
    kill -USR1 "$step_pid" 2> /dev/null || return 0
    (
        while sleep "${STOP_RESEND_S:-60}"; do
            kill -0 "$step_pid" 2> /dev/null || exit 0
            [[ $(cat "$latest" 2> /dev/null || true) == "$before" ]] || exit 0
            log "no checkpoint since the stop warning yet; sending SIGUSR1 again"
            kill -USR1 "$step_pid" 2> /dev/null || exit 0
        done
    ) &
}

# Put this job back in the queue; Slurm ends it (and its steps) and later runs this script again with the same
# arguments. Does not return.
requeue_job() {
    if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50})); then
        log "not requeueing: restart ${SLURM_RESTART_COUNT} reached MAX_REQUEUES=${MAX_REQUEUES:-50}"
        exit 1
    fi
    log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || {
        log "scontrol requeue $SLURM_JOB_ID failed; submit the same command again to resume"
        exit 1
    }
    # Slurm signals this shell as it takes the job down; wait for that rather than end the job as "completed".
    trap - USR1 TERM
    sleep 300 &
    wait $! || true
    exit 0
}
