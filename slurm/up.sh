#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (Debian's slurm-wlm + munge), for CI and local
# tests of the grid fan-out. Idempotent: installs what is missing, writes a minimal slurm.conf
# for this host, starts munged, slurmctld and slurmd (no systemd needed), waits until a job runs.
# Stop it with slurm/down.sh (by PID). Needs root (or passwordless sudo) and the Debian mirror.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
LOGDIR=${SLURM_LOGDIR:-/var/log/slurm}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  echo "[slurm/up] installing slurmctld slurmd slurm-client munge"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

$SUDO install -d -m 755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
# munge: the package made a key; the daemon runs as the munge user.
if [ ! -f /etc/munge/munge.key ]; then
  $SUDO /usr/sbin/mungekey --create --force 2>/dev/null || \
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
fi
$SUDO install -d -o munge -g munge -m 755 /run/munge
if ! ( [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null ); then
  $SUDO runuser -u munge -- /usr/sbin/munged
fi

# slurm.conf for this node. Memory: 90% of RAM; DefMemPerCPU keeps array tasks from taking the
# whole node (otherwise they run one at a time). slurmd runs as "localhost": no DNS needed.
NODE_LINE=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+/NodeName=localhost/; s/RealMemory=[0-9]+//')
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
CONF=$(cat <<EOF
ClusterName=zsadx
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$NODE_LINE RealMemory=$MEM_MB NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
echo "$CONF" | $SUDO tee /etc/slurm/slurm.conf >/dev/null

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# -c: a test cluster starts with an empty queue (jobs left by an aborted run would hold the node).
if ! running /run/slurmctld.pid; then $SUDO slurmctld -c; fi
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if ! running /run/slurmd.pid; then $SUDO slurmd -N localhost; fi
for _ in $(seq 60); do sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && break; sleep 0.5; done
$SUDO scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
# Return only when jobs really run (the first one is scheduled 1-3 s after slurmd registers); a
# node busy with earlier jobs is already known to run them.
if sinfo -h -o %t | grep -q '^idle'; then timeout 120 srun -N1 -n1 -t 1 hostname >/dev/null; fi
echo "[slurm/up] SLURM is up: $(sinfo -h -o '%P %a %D %t %N')"
