# shellcheck shell=bash
# Shared by the kiln sbatch scripts; sourcing it only defines functions.
#
#   kiln_train ENTRY [--launcher L] [--nproc-per-node N] [HYDRA OVERRIDES...]
#       (batch shell) start ENTRY (launch/pretrain.py, launch/sft.py) on every node of the
#       job, wait for it, and on USR1 ask it to checkpoint and stop, then requeue the job.
#   kiln_prepare_data [prepare_data.py ARGS...]
#       (batch shell) one task of a data-preparation array job.
#   kiln_dedup_global [dedup_global.py ARGS...]
#       (batch shell) one task of one stage of the cross-task dedup job.
#   kiln_task ENTRY [ARGS...]
#       (every srun task) start this node's training processes, or be one of them.
#
# Environment (all optional):
#   KILN_LAUNCHER        torchrun (default) | deepspeed | srun
#   KILN_NPROC_PER_NODE  processes per node; default: GPUs per node (for srun: the job's
#                        --ntasks-per-node if given), 1 without GPUs
#   KILN_PYTHON          interpreter (default python3); KILN_ENV: a file sourced first
#                        (module load, conda activate, ...)
#   KILN_MASTER_ADDR / KILN_MASTER_PORT  rendezvous; default: first node of the job and
#                        10000 + job id % 20000
#   KILN_SRUN_ARGS       extra flags for the srun that starts the tasks
#   KILN_STOP_FILE       file whose existence asks training to checkpoint and stop; default
#                        $SLURM_SUBMIT_DIR/.kiln-stop.<job id> (must be visible to all nodes)
#   KILN_REQUEUE_ON      signals after which the job requeues itself (default "USR1"; add TERM
#                        to also requeue on SIGTERM, but then a plain scancel requeues too)

kiln_log() { printf '[kiln-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

kiln_die() {
  kiln_log "error: $*" >&2
  exit 2
}

# Activate the user's environment and choose the interpreter.
kiln_env() {
  if [ -n "${KILN_ENV:-}" ]; then
    set +u  # activation scripts (conda, modules) often read unset variables
    # shellcheck disable=SC1090
    source "$KILN_ENV"
    set -u
  fi
  KILN_PYTHON=${KILN_PYTHON:-python3}
  command -v "$KILN_PYTHON" >/dev/null || kiln_die "KILN_PYTHON=$KILN_PYTHON not found (set KILN_PYTHON or KILN_ENV)"
  export KILN_ROOT KILN_PYTHON PYTHONUNBUFFERED=1
}

# GPUs on this node as Slurm or the driver sees them; 0 without GPUs.
kiln_gpus_per_node() {
  local n=${SLURM_GPUS_ON_NODE:-}
  if [ -z "$n" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then n=${SLURM_GPUS_PER_NODE##*:}; fi  # "a100:8" -> 8
  if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    n=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
  fi
  if [ -z "$n" ] && command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  case $n in '' | *[!0-9]*) n=0 ;; esac
  echo "$n"
}

# The rendezvous every launcher uses: the job's first node, a port derived from the job id.
kiln_rendezvous() {
  MASTER_ADDR=${KILN_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk "NR == 1")}
  MASTER_PORT=${KILN_MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}  # below the ephemeral range (32768+)
  export MASTER_ADDR MASTER_PORT
}

# A DeepSpeed hostfile for the job: every node with slots=processes per node.
kiln_hostfile() {
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$KILN_NPROC_PER_NODE/"
}

# SIGUSR1 (time limit near: --signal=B:USR1@N, or scancel --batch --signal=USR1) or SIGTERM
# (preemption, scancel): training sees the stop file at the end of its current step on every
# rank, checkpoints and exits 0.
kiln_on_signal() {
  KILN_STOP_SIGNAL=$1
  kiln_log "SIG$1: asking training to checkpoint after the current step and stop ($KILN_STOP_FILE)"
  touch "$KILN_STOP_FILE"
}

kiln_train() {
  [ -n "${SLURM_JOB_ID:-}" ] || kiln_die "not inside a Slurm job: submit with sbatch"
  local entry=$1 a
  shift
  local overrides=()
  while [ $# -gt 0 ]; do
    a=$1
    case $a in
      --launcher | --nproc-per-node | --nproc_per_node)
        [ $# -ge 2 ] || kiln_die "$a needs a value"
        if [ "$a" = --launcher ]; then KILN_LAUNCHER=$2; else KILN_NPROC_PER_NODE=$2; fi
        shift 2 ;;
      --launcher=*) KILN_LAUNCHER=${a#*=}; shift ;;
      --nproc-per-node=* | --nproc_per_node=*) KILN_NPROC_PER_NODE=${a#*=}; shift ;;
      *) overrides+=("$a"); shift ;;
    esac
  done
  [ -f "$KILN_ROOT/$entry" ] || kiln_die "$KILN_ROOT/$entry not found"
  kiln_env
  kiln_rendezvous
  KILN_LAUNCHER=${KILN_LAUNCHER:-torchrun}
  local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  if [ -z "${KILN_NPROC_PER_NODE:-}" ]; then
    KILN_NPROC_PER_NODE=$(kiln_gpus_per_node)
    if [ "$KILN_LAUNCHER" = srun ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
      KILN_NPROC_PER_NODE=$SLURM_NTASKS_PER_NODE
    fi
    [ "$KILN_NPROC_PER_NODE" -gt 0 ] || KILN_NPROC_PER_NODE=1
  fi
  case $KILN_NPROC_PER_NODE in '' | *[!0-9]* | 0) kiln_die "KILN_NPROC_PER_NODE=$KILN_NPROC_PER_NODE" ;; esac
  local tasks
  case $KILN_LAUNCHER in
    torchrun | deepspeed) tasks=$nnodes ;;  # one launcher per node, it starts the processes
    srun) tasks=$((nnodes * KILN_NPROC_PER_NODE)) ;;  # Slurm starts every process
    *) kiln_die "KILN_LAUNCHER=$KILN_LAUNCHER: use torchrun, deepspeed or srun" ;;
  esac
  KILN_STOP_FILE=${KILN_STOP_FILE:-${SLURM_SUBMIT_DIR:-$PWD}/.kiln-stop.$SLURM_JOB_ID}
  export KILN_LAUNCHER KILN_NPROC_PER_NODE KILN_STOP_FILE
  rm -f "$KILN_STOP_FILE"  # a requeued job keeps its id: drop the request that stopped it

  kiln_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $entry on $nnodes node(s) ($SLURM_JOB_NODELIST)," \
    "launcher=$KILN_LAUNCHER nproc_per_node=$KILN_NPROC_PER_NODE rendezvous=$MASTER_ADDR:$MASTER_PORT"
  kiln_log "overrides: ${overrides[*]}"
  KILN_STOP_SIGNAL=
  trap 'kiln_on_signal USR1' USR1
  trap 'kiln_on_signal TERM' TERM
  # The launch runs in the background so that the traps run as soon as a signal arrives
  # (bash defers traps until a foreground command returns; `wait` returns at once).
  # shellcheck disable=SC2086,SC2016  # KILN_SRUN_ARGS is a list of flags; $@ expands in the task
  srun --nodes="$nnodes" --ntasks="$tasks" --ntasks-per-node=$((tasks / nnodes)) --whole \
    --kill-on-bad-exit=1 ${KILN_SRUN_ARGS:-} \
    bash -c 'source "$KILN_ROOT/slurm/common.sh" && kiln_task "$@"' kiln-task \
    "$KILN_ROOT/$entry" "${overrides[@]}" &
  local pid=$! rc
  while :; do
    rc=0
    wait "$pid" || rc=$?
    # > 128: a trap interrupted the wait (or srun died of a signal): wait again while it runs
    if [ "$rc" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if [ "$rc" -gt 128 ]; then  # srun may have ended between the trap and kill -0: its real status
    local again=0
    wait "$pid" 2>/dev/null || again=$?
    [ "$again" -eq 127 ] || rc=$again
  fi
  trap - USR1 TERM
  rm -f "$KILN_STOP_FILE"
  if [ -z "$KILN_STOP_SIGNAL" ]; then
    kiln_log "training exited with status $rc"
    return "$rc"
  fi
  if [ "$rc" -ne 0 ]; then
    kiln_log "training exited with status $rc after SIG$KILN_STOP_SIGNAL: not requeueing"
    return "$rc"
  fi
  case " ${KILN_REQUEUE_ON-USR1} " in
    *" $KILN_STOP_SIGNAL "*)
      kiln_log "checkpoint written after SIG$KILN_STOP_SIGNAL; requeueing job $SLURM_JOB_ID" \
        "(it resumes with resume=auto as restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
      scontrol requeue "$SLURM_JOB_ID" || { kiln_log "scontrol requeue failed"; return 1; } ;;
    *) kiln_log "checkpoint written after SIG$KILN_STOP_SIGNAL; not requeueing (KILN_REQUEUE_ON=${KILN_REQUEUE_ON-USR1})" ;;
  esac
  return 0
}

kiln_task() {
  local entry=$1
  shift
  case $KILN_LAUNCHER in
    torchrun)
      exec "$KILN_PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" \
        --nproc_per_node="$KILN_NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        "$entry" "$@" ;;
    deepspeed)  # one launcher per node, no ssh: the hostfile gives the world, --node_rank this node
      local hostfile=${TMPDIR:-/tmp}/kiln-hostfile.$SLURM_JOB_ID.$SLURM_NODEID
      kiln_hostfile >"$hostfile"
      exec "$KILN_PYTHON" -m deepspeed.launcher.runner --hostfile="$hostfile" --no_ssh \
        --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        "$entry" "$@" ;;
    srun)  # Slurm started this process: the env torch.distributed and DeepSpeed read
      export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
      export LOCAL_WORLD_SIZE=$KILN_NPROC_PER_NODE OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
      exec "$KILN_PYTHON" "$entry" "$@" ;;
    *) kiln_die "KILN_LAUNCHER=$KILN_LAUNCHER" ;;
  esac
}

kiln_prepare_data() {
  kiln_env
  kiln_log "job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}} array task ${SLURM_ARRAY_TASK_ID:-none}" \
    "of ${SLURM_ARRAY_TASK_COUNT:-1} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s)"
  exec "$KILN_PYTHON" "$KILN_ROOT/launch/prepare_data.py" "$@"
}

kiln_dedup_global() {
  kiln_env
  kiln_log "job ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}} array task ${SLURM_ARRAY_TASK_ID:-none}" \
    "of ${SLURM_ARRAY_TASK_COUNT:-1} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s)"
  exec "$KILN_PYTHON" "$KILN_ROOT/launch/dedup_global.py" "$@"
}
