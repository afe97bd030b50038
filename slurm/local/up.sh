#!/usr/bin/env bash
# Start a real one-node Slurm "cluster" on localhost for tests and for trying the sbatch
# scripts: installs Debian's slurmctld, slurmd, slurm-client and munge when missing (apt,
# needs root), writes a config under $SLURM_LOCAL_DIR, starts munged, slurmctld and slurmd
# (no systemd, no cgroups) and waits until the node is idle. Idempotent.
#
#   export SLURM_LOCAL_DIR=/tmp/slurm-local            # default: $TMPDIR/slurm-local
#   bash slurm/local/up.sh && export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf
#   sbatch ...; squeue; ...; bash slurm/local/down.sh
#
# SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_SLURMD_PORT (default 6817 / 6818) let two such
# clusters (two test sessions) run side by side; SLURM_LOCAL_CPUS sets the node's CPUs.
# Tuned for tests: cred_expire=10 and sched_interval=2 bring the hold of a requeued job from ~120 s to ~14 s
# (`scontrol update jobid=N StartTime=now` releases it in ~4 s).
set -euo pipefail
D=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}; H=$(hostname -s)
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}; SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
export SLURM_CONF=$D/slurm.conf
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "up.sh: Slurm is not installed and apt-get is not available" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
fi
mkdir -p "$D"/{munge,state,spool,log}
chmod 755 "$D" "$D/munge"          # munged insists the socket dir is o+x
[ -s "$D/munge/munge.key" ] || mungekey -c -k "$D/munge/munge.key"
# nproc honours OMP_NUM_THREADS, which test environments often set to 1
CPUS=${SLURM_LOCAL_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
MEM_MB=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 ))
cat > "$SLURM_CONF" <<CONF
ClusterName=localci
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=5
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$D/munge/munged.pid" || munged -S "$D/munge/munge.socket.2" \
  --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
  --log-file="$D/munge/munged.log" --seed-file="$D/munge/munged.seed"
alive "$D/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
alive "$D/slurmd.pid" || slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  case "$(sinfo -h -n "$H" -o %t 2>/dev/null)" in idle|mix|alloc|comp) sinfo; exit 0;; esac
  sleep 1
done
echo "slurm node $H did not become idle" >&2; tail -n 20 "$D"/log/*.log >&2; exit 1
