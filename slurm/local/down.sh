#!/usr/bin/env bash
# Stop the daemons started by up.sh (by PID, from $SLURM_LOCAL_DIR) and wipe job state.
D=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/slurm-local}; export SLURM_CONF=$D/slurm.conf
if [ -s "$D/slurmctld.pid" ] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null; then
  squeue -h -o %i | xargs -r scancel            # let slurmstepds exit cleanly
  for _ in $(seq 30); do [ -z "$(squeue -h -o %i)" ] && break; sleep 1; done
fi
stop() {  # the pidfile is removed before the daemon exits, so grab the PID first
  [ -s "$1" ] || return 0; local p; p=$(cat "$1"); kill "$p" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
}
stop "$D/slurmd.pid"; stop "$D/slurmctld.pid"; stop "$D/munge/munged.pid"
rm -rf "$D/state" "$D/spool" "$D"/*.pid
