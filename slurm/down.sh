#!/usr/bin/env bash
# Stop the single-node SLURM started by slurm/up.sh, by the daemons' PID files (TERM, then KILL).
set -uo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || continue
  $SUDO kill -TERM "$pid"
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && $SUDO kill -KILL "$pid"
done
echo "[slurm/down] stopped"
