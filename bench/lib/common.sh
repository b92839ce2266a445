# Shared by bench/scheduling, bench/dispatch and bench/slot-reuse (sourced, not run).
#
# Each benchmark gets one temporary directory (stores, states, records) and cgroups named
# nix-tier-bench-<pid>-<run>; bench_cleanup, run on EXIT/INT/TERM, kills what is left inside
# those cgroups (only processes this benchmark started), removes them and the directory.
#
# Runs that use the tier hook get NIX_TIER_CGROUP_ROOT = the benchmark's own cgroup: the hook
# then creates its per-build cgroups (`nix-tier/<drv>`) inside it, so that one parent accounts
# for the whole run (nix-store, hook, builders) whether or not the hook moved a builder, and
# nothing is left in the machine's real nix-tier parent.

set -euo pipefail

bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${NIX_TIER_TARGET_DIR:-$bench_root/target/release}
workload=$bench_root/bench/lib/workload.py
cg_base=/sys/fs/cgroup
bench_cgroups=()
bench_tmp=

die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }
say() { printf '%s\n' "$*" >&2; }

bench_init() {
  local name=$1
  [ "$(id -u)" = 0 ] || die "needs root (cgroups, mount namespaces)"
  for b in nix-tier nix-tier-hook nix-tier-testbuilder; do
    [ -x "$bin/$b" ] || die "$bin/$b missing: run cargo build --release"
  done
  for c in nix-instantiate nix-store python3 flock; do
    command -v "$c" >/dev/null || die "$c not found"
  done
  [ -f "$cg_base/memory/memory.limit_in_bytes" ] || die "needs a writable cgroup v1 memory controller at $cg_base/memory"
  bench_tmp=$(mktemp -d "${TMPDIR:-/tmp}/nix-tier-$name.XXXXXX")
  bench_id="nix-tier-bench-$$"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  unset NIX_PATH NIX_REMOTE
  # A snapshot of the binaries: a `cargo build` elsewhere in the tree during the run must not
  # change what is measured halfway.
  mkdir -p "$bench_tmp/bin"
  for b in nix-tier nix-tier-hook nix-tier-testbuilder nix-tier-bench; do
    [ -x "$bin/$b" ] && cp "$bin/$b" "$bench_tmp/bin/"
  done
  bin=$bench_tmp/bin
  bench_build="$(git -C "$bench_root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$bench_root" diff --quiet HEAD -- hook model cgroups testbuilder 2>/dev/null || echo '+local changes')"
  bench_build="$bench_build, nix-tier-hook sha256 $(sha256sum "$bin/nix-tier-hook" | cut -c1-12)"
}

# The pids in a cgroup directory and all its descendants.
cg_pids() {
  find "$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true
}

# Kills what runs in cgroup $1 (all controllers), removes it depth-first.
cg_remove() {
  local name=$1 ctl dir pids tries
  for tries in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(cg_pids "$cg_base/memory/$name")
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  for ctl in memory cpu cpuacct; do
    dir=$cg_base/$ctl/$name
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [ -d "$dir" ] && say "warning: could not remove $dir"
  done
  return 0
}

bench_cleanup() {
  local rc=$? name
  trap - EXIT
  for name in "${bench_cgroups[@]}"; do
    cg_remove "$name"
  done
  if [ -n "${BENCH_KEEP_TMP:-}" ]; then
    say "kept $bench_tmp (BENCH_KEEP_TMP)"
  elif [ -n "$bench_tmp" ]; then
    rm -rf "$bench_tmp"
  fi
  exit $rc
}

# Creates the cgroup $1 under memory, cpu and cpuacct; memory limit $2 MiB ("" for none).
cg_create() {
  local name=$1 limit=${2:-} ctl
  for ctl in memory cpu cpuacct; do
    mkdir -p "$cg_base/$ctl/$name"
  done
  bench_cgroups+=("$name")
  if [ -n "$limit" ]; then
    echo $((limit * 1024 * 1024)) >"$cg_base/memory/$name/memory.limit_in_bytes"
  fi
}

# The environment of an isolated Nix installation rooted at $1 (store, state, logs, conf).
nix_env() {
  local r=$1
  mkdir -p "$r"/{store,state,log,conf,home,records}
  echo "NIX_STORE_DIR=$r/store NIX_STATE_DIR=$r/state NIX_LOG_DIR=$r/log NIX_CONF_DIR=$r/conf" \
       "NIX_USER_CONF_FILES=$r/conf/user.conf HOME=$r/home XDG_CACHE_HOME=$r/home/.cache"
}

# Writes $1/conf/nix.conf: base settings plus the lines given.
write_conf() {
  local r=$1
  shift
  {
    printf 'substituters =\nsandbox = false\nbuild-users-group =\n'
    printf '%s\n' "$@"
  } >"$r/conf/nix.conf"
}

# Writes this machine's profile with a build section to $1: budget MiB, then
# heavy/medium/light as maxJobs:cores:memoryMiB.
write_profile() {
  local file=$1 budget=$2 heavy=$3 medium=$4 light=$5
  "$bin/nix-tier" profile | python3 -c '
import json, sys
budget, heavy, medium, light = sys.argv[1:5]
def tier(s):
    j, c, m = (int(x) for x in s.split(":"))
    return {"maxJobs": j, "cores": c, "memoryMiB": m}
p = json.load(sys.stdin)
p["source"] = "pinned"
p["build"] = {"memoryBudgetMiB": int(budget), "defaultTier": "light", "rules": [],
              "tiers": {"heavy": tier(heavy), "medium": tier(medium), "light": tier(light)}}
json.dump(p, sys.stdout, indent=2)' "$budget" "$heavy" "$medium" "$light" >"$file"
  "$bin/nix-tier" profile --check "$file" >/dev/null
}

# Runs "$@" inside cgroup $1 (all controllers). With $2 = hook, that cgroup is also the hook's
# NIX_TIER_CGROUP_ROOT (see the top of this file). In the background, waited for, so that
# INT/TERM reach the traps at once (cleanup kills the cgroup).
run_in_cgroup() {
  run_in_cgroup_fg "$@" &
  wait $!
}

run_in_cgroup_fg() {
  local name=$1 mode=$2
  shift 2
  if [ "$mode" = hook ]; then
    export NIX_TIER_CGROUP_ROOT=$cg_base/memory/$name
  fi
  bash -c '
    for ctl in memory cpu cpuacct; do echo $$ > "'"$cg_base"'/$ctl/'"$name"'/cgroup.procs"; done
    exec "$@"' bench-run "$@"
}

# OOM kills the kernel logged for tasks in cgroup $1 or below (empty when dmesg is unreadable).
dmesg_oom_kills() {
  local out
  out=$(dmesg 2>/dev/null) || { echo ""; return; }
  printf '%s\n' "$out" | grep -c "oom-kill:.*task_memcg=/$1[/,]" || true
}

now_ms() { date +%s%3N; }

# The statically linked test builder (it runs inside Nix's sandbox, which has no dynamic
# loader), copied into the run's snapshot of binaries; its path. Call after bench_init.
static_testbuilder() {
  local built=$bench_root/target/static/$(rustc -vV | sed -n 's/^host: //p')/release/nix-tier-testbuilder
  [ -x "$built" ] || die "$built missing: run ./scripts/test (it builds the static test builder)"
  cp "$built" "$bench_tmp/bin/nix-tier-testbuilder-static"
  echo "$bench_tmp/bin/nix-tier-testbuilder-static"
}

# Waits (at most 10 s) until the broker of the state directory $1 has released every build's
# watcher lock: it records a build once its processes are gone, then lets go. A released lock
# file stays, emptied, for the next build.
wait_for_watchers() {
  local leases=$1/leases deadline=$(( $(date +%s%3N) + 10000 ))
  while [ -n "$(find "$leases" -type f -size +0c -print -quit 2>/dev/null)" ] && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
}

# The median and the mean number of `try` requests per build the broker at socket $1 was
# asked, and the CPU time the broker (decisions and watcher) has used so far, ms ("0 0 0" when it
# cannot tell). The broker is the socket's peer.
broker_figures() {
  python3 - "$1" <<'PY' 2>/dev/null || echo "0 0 0"
import json, os, socket, statistics, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
s.sendall(b'"tries"\n')
answer = s.makefile().readline()
tries = json.loads(answer)["tries"]
stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu_ms = (int(stat[11]) + int(stat[12])) * 1000 // os.sysconf("SC_CLK_TCK")
print(*((statistics.median(tries), statistics.mean(tries)) if tries else (0, 0)), cpu_ms)
PY
}

machine_line() {
  local model mem
  model=$(lscpu | sed -n 's/^Model name: *//p' | head -n1)
  mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
  echo "$model, $(nproc) cores, $mem, $(. /etc/os-release; echo "$PRETTY_NAME"), Nix $(NIX_CONF_DIR=/nonexistent nix-store --version 2>/dev/null | sed 's/.* //') ($(date -u '+%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)); nix-tier $bench_build"
}
