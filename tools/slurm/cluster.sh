#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, loopback only, for `nucbook batch --executor slurm` and its tests.
#
#   tools/slurm/cluster.sh install   apt-get install Debian's slurm-wlm and munge when missing (root; ~30 s)
#   tools/slurm/cluster.sh start     install if needed, write the config, start munged, slurmctld and slurmd,
#                                    wait until `sinfo` shows the node idle (prints the SLURM_CONF line to export)
#   tools/slurm/cluster.sh stop      stop the three daemons (by the pids in their pid files)
#   tools/slurm/cluster.sh status    daemons running, and sinfo
#   tools/slurm/cluster.sh env       print `export SLURM_CONF=...`: the clients (sbatch, squeue, ...) read it
#
# Everything lives under $NUCBOOK_SLURM_DIR (default /tmp/nucbook-slurm): slurm.conf (from slurm.conf.in beside
# this script), the munge key and socket, state, spool, pid and log files. No file in /etc is written. The node is
# `localhost` (127.0.0.1) with this machine's CPUs and memory, one partition `debug`. Ports: $NUCBOOK_SLURM_PORT
# (default 6817) for slurmctld and the next one for slurmd; srun uses the 20 ports above them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${NUCBOOK_SLURM_DIR:-/tmp/nucbook-slurm}"
PORT="${NUCBOOK_SLURM_PORT:-6817}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

have_all() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
             && command -v munged >/dev/null && command -v mungekey >/dev/null; }

install() {
  if have_all; then say "slurm-wlm and munge are installed ($(slurmctld -V))"; return 0; fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are missing and installing them needs root (apt-get)"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
  local t0=$SECONDS
  say "installing slurm-wlm and munge with apt-get (about 30 s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
  have_all || die "slurm-wlm and munge were installed but slurmctld/slurmd/sbatch/munged are not on PATH"
  say "installed $(slurmctld -V) and munge in $((SECONDS - t0)) s"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# the node's state; only asked while slurmctld runs (sinfo waits a long time for a controller that is not there)
node_state() { pid_alive "$DIR/run/slurmctld.pid" && timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -1 || true; }

write_conf() {
  mkdir -p "$DIR"/{state,spool/slurmd,log,run,munge}
  chmod 755 "$DIR/munge"  # munged wants its socket folder searchable; the key itself is 0400
  local cpus mem
  cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
  mem=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
  [ -n "$cpus" ] && [ -n "$mem" ] || die "cannot read this machine's CPUs and memory from 'slurmd -C'"
  mem=$((mem * 9 / 10))  # leave some memory to the system: a node whose memory is larger than reported is drained
  sed -e "s|@DIR@|$DIR|g" -e "s|@CTLD_PORT@|$PORT|" -e "s|@SLURMD_PORT@|$((PORT + 1))|" \
      -e "s|@SRUN_PORTS@|$((PORT + 2))-$((PORT + 21))|" -e "s|@CPUS@|$cpus|" -e "s|@MEM_MB@|$mem|" \
      "$HERE/slurm.conf.in" > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

start() {
  install
  [ "$(id -u)" = 0 ] || die "the daemons run as root here (SlurmUser=root); run this as root"
  if pid_alive "$DIR/run/slurmd.pid" && [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]; then
    say "already running ($DIR)"; echo "export SLURM_CONF=$CONF"; return 0
  fi
  stop >/dev/null 2>&1 || true
  write_conf
  if [ ! -s "$DIR/munge/munge.key" ]; then mungekey --create --keyfile="$DIR/munge/munge.key" --force; fi
  chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
         --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start: $(tail -3 "$DIR/log/munged.log" 2>/dev/null)"
  # -c: start with no jobs (a test cluster must not resume the jobs of an earlier session)
  slurmctld -c -f "$CONF" || die "slurmctld did not start: $(tail -5 "$DIR/log/slurmctld.log" 2>/dev/null)"
  slurmd -f "$CONF" -N localhost || die "slurmd did not start: $(tail -5 "$DIR/log/slurmd.log" 2>/dev/null)"
  local t0=$SECONDS state=
  while [ $((SECONDS - t0)) -lt 60 ]; do
    state=$(node_state)
    if [ "$state" = idle ]; then say "node localhost idle after $((SECONDS - t0)) s ($DIR)"; echo "export SLURM_CONF=$CONF"; return 0; fi
    if [[ "$state" == drain* || "$state" == inval* ]]; then scontrol update nodename=localhost state=resume 2>/dev/null || true; fi
    sleep 1
  done
  echo "--- slurmctld.log"; tail -15 "$DIR/log/slurmctld.log" 2>/dev/null || true
  echo "--- slurmd.log"; tail -15 "$DIR/log/slurmd.log" 2>/dev/null || true
  die "the node is not idle after 60 s (state: '${state:-unknown}'); logs in $DIR/log"
}

stop_one() {  # pid file, name: SIGTERM, then SIGKILL after 10 s
  local f="$1" name="$2" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

stop() {
  stop_one "$DIR/run/slurmd.pid" slurmd
  stop_one "$DIR/run/slurmctld.pid" slurmctld
  stop_one "$DIR/run/munged.pid" munged
}

status() {
  local n
  for n in munged slurmctld slurmd; do
    if pid_alive "$DIR/run/$n.pid"; then say "$n running (pid $(cat "$DIR/run/$n.pid"))"; else say "$n not running"; fi
  done
  if pid_alive "$DIR/run/slurmctld.pid"; then timeout 10 sinfo || true; fi
  pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
