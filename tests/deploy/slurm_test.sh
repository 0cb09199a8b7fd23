#!/usr/bin/env bash
# `aha render slurm` for real (ctest label slurm): starts a one-node Slurm cluster on this host from
# Debian's packages (munged, slurmctld, slurmd; configuration, state and sockets in a temp folder,
# ports chosen free, the node named localhost at 127.0.0.1 so every address stays on loopback),
# renders configs/tiny-cpu.yaml shortened with --set (SFT on the first 800 cold-start solutions for
# one epoch, 6 GRPO steps, evaluation on 40 held-out questions), submits it with `sbatch --wait`,
# and checks the exit status and the run directory; then renders it again with 8 steps and
# submits that, which must resume the same run (stages skipped, the learner from step 6). Prints
# the wall time.
#   tests/deploy/slurm_test.sh BUILD_DIR/bin      (AHA_KEEP=1 keeps the temp folder for a look)
# Exit 77 (skipped) when not root: slurmd and the job run as root here (SlurmUser=root).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 BUILD_DIR/bin" >&2; exit 2; }
BIN=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
started=$(date +%s)
say() { echo "slurm_test: $*"; }

if [ "$(id -u)" -ne 0 ]; then say "skipped: needs root (slurmd and the job run as root)"; exit 77; fi
for p in munged slurmctld slurmd sbatch scontrol scancel sinfo; do
  command -v "$p" >/dev/null || { say "$p not found: scripts/setup.sh installs munge slurmctld slurmd slurm-client" >&2; exit 1; }
done

T=$(mktemp -d /tmp/aha-slurm-test.XXXXXX)
DAEMONS=()
JOB=""
cleanup() {
  local rc=$?
  if [ -n "$JOB" ] && [ -n "${SLURM_CONF:-}" ]; then scancel "$JOB" 2>/dev/null || true; fi
  for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${DAEMONS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$rc" -ne 0 ]; then
    say "FAILED; the end of every log:"
    for f in "$T"/log/* "$T"/job/slurm-*.out "$T"/job/run/logs/*.log; do
      [ -f "$f" ] && { echo "== $f"; tail -n 15 "$f"; }
    done
  fi
  if [ -n "${AHA_KEEP:-}" ]; then say "kept $T"; else rm -rf "$T"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# Free ports: two for Slurm, and for aha a base B with B..B+17 free (ports of 4 roles).
read -r CTLD_PORT SLURMD_PORT AHA_BASE < <(python3 "$ROOT/tests/deploy/free_ports.py" 1 1 18)

# munge: a fresh key; munged refuses to run as root without --force.
mkdir -p "$T/munge" "$T/state" "$T/spool" "$T/log"
chmod 700 "$T/munge"
head -c 1024 /dev/urandom > "$T/munge/munge.key"
chmod 400 "$T/munge/munge.key"
munged --foreground --force --socket="$T/munge/munge.socket" --key-file="$T/munge/munge.key" \
  --pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" --seed-file="$T/munge/seed" \
  > "$T/log/munged.out" 2>&1 &
DAEMONS+=($!)
for _ in $(seq 50); do [ -S "$T/munge/munge.socket" ] && break; sleep 0.1; done

cat > "$T/slurm.conf" <<EOF
ClusterName=aha-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$T/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
# A container: no cgroups to manage, so processes are tracked by their parent ids and tasks are
# not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# The job asks a CPU per process (4); the node says 8 whatever this machine has.
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$T/slurm.conf"
slurmctld -D -i -f "$SLURM_CONF" > "$T/log/slurmctld.out" 2>&1 &
DAEMONS+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" > "$T/log/slurmd.out" 2>&1 &
DAEMONS+=($!)
for _ in $(seq 60); do
  [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -o %T)" = idle ] || { say "the Slurm node did not come up"; exit 1; }
say "Slurm up in $(( $(date +%s) - started )) s (slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT, aha ports from $AHA_BASE)"

# The tiny job, shortened.
head -n 800 "$ROOT/configs/data/arith-sft.jsonl" > "$T/sft.jsonl"
head -n 40 "$ROOT/configs/data/arith-eval.jsonl" > "$T/eval.jsonl"
# run_job STEPS: renders the job with STEPS GRPO steps into $T/job and runs it to the end.
run_job() {
  "$BIN/aha" render slurm "$ROOT/configs/tiny-cpu.yaml" --out "$T/job" --bind 127.0.0.1 --time 00:30:00 \
    --set ports.base="$AHA_BASE" --set sft.data="$T/sft.jsonl" --set sft.epochs=1 --set data.eval="$T/eval.jsonl" \
    --set grpo.steps="$1" --set checkpoint.every=3 > /dev/null
  local submitted rc=0 out
  submitted=$(date +%s)
  out=$(sbatch --wait --parsable "$T/job/aha.sbatch") || rc=$?
  JOB=${out%%;*}
  say "sbatch --wait ($1 steps): exit $rc after $(( $(date +%s) - submitted )) s (job $JOB)"
  cat "$T/job/slurm-$JOB.out"
  [ "$rc" -eq 0 ] || { say "the job failed"; exit 1; }
  scontrol show job "$JOB" | grep -q "JobState=COMPLETED" || { say "job $JOB is not COMPLETED"; exit 1; }
  JOB=""
}
run_job 6

RUN="$T/job/run"
bash "$ROOT/tests/deploy/check_run_dir.sh" "$RUN" 6
[ -e "$RUN/procs/prepare.done" ] || { say "missing procs/prepare.done (the rendered job's prepare step)"; exit 1; }
if pgrep -f "bin/aha.*$T" >/dev/null; then say "processes outlived the job: $(pgrep -af "bin/aha.*$T")"; exit 1; fi

# Resubmitted with more steps, the job resumes: no stage runs again, the learner continues from its
# step-6 checkpoint, replay keeps its database.
run_job 8
steps=$(wc -l < "$RUN/metrics/learner.jsonl")
[ "$steps" -eq 8 ] || { say "after resuming, metrics/learner.jsonl has $steps lines, want 8"; exit 1; }
[ "$(grep -c '^\$ ' "$RUN/logs/sft.log")" -eq 1 ] || { say "the sft stage ran again"; exit 1; }
grep -q "resumed from .*step-000006 at step 6" "$RUN/logs/learner.log" || { say "the learner did not resume from step 6"; exit 1; }
grep -q "stopped at step 8" "$RUN/logs/learner.log" || { say "the resumed learner did not reach step 8"; exit 1; }
[ -e "$RUN/checkpoints/step-000008/model.safetensors" ] || { say "no step-8 checkpoint"; exit 1; }
if pgrep -f "bin/aha.*$T" >/dev/null; then say "processes outlived the job: $(pgrep -af "bin/aha.*$T")"; exit 1; fi

say "passed: aha-replay, aha-rewardd, aha-learner and aha-actor as Slurm steps, 6 GRPO steps, resumed to $steps;" \
    "wall time $(( $(date +%s) - started )) s"
