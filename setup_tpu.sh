#!/usr/bin/env bash
# setup_tpu.sh: a Cloud TPU VM or pod slice ready for lmtrain, from nothing to a verified install.
#
#   bash setup_tpu.sh create  --name NAME --zone ZONE [options]   request it (queued resource), wait until ACTIVE,
#                                                                  install lmtrain on every worker and verify JAX
#   bash setup_tpu.sh install --name NAME --zone ZONE [options]   install and verify on an ACTIVE resource
#   bash setup_tpu.sh verify  --name NAME --zone ZONE [options]   check jax.device_count()/process_count() only
#   bash setup_tpu.sh status  --name NAME --zone ZONE             the queued resource's state
#   bash setup_tpu.sh delete  --name NAME --zone ZONE             delete the queued resource and its TPU VMs
#
# Run `bash setup_tpu.sh --help` for the options. --dry-run prints every gcloud command instead of running it.
# Exit status: 0 done, 1 a cloud step failed (worth retrying), 2 bad arguments.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash setup_tpu.sh [create|install|verify|status|delete] --name NAME --zone ZONE [options]

  --name NAME              queued resource and TPU VM name (required)
  --zone ZONE              e.g. us-central2-b for v4, us-east5-a for v5p (required)
  --project PROJECT        default: gcloud's configured project
  --accelerator-type TYPE  v4-8 (default), v4-32, v5litepod-16, v5p-64, v6e-8, ...
  --runtime-version V      default by family: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p),
                           v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4 and older)
  --capacity KIND          spot (default: cheapest, can be preempted), on-demand or reserved
  --ship HOW               scp (default) or gs://BUCKET/PATH.tar.gz: how the code reaches the workers
                           (a GCS tarball is faster for pods with many workers)
  --python-version V       Python for the workers' virtualenv (default 3.11; the TPU images have 3.10)
  --expect-devices N       JAX devices expected in total (default: from the accelerator type)
  --max-recreates N        recreations after FAILED or SUSPENDED before giving up (default 5)
  --retries N              attempts for each install step on the workers (default 3)
  --retry-delay-s S        wait before the first retry, doubled for each next one (default 10)
  --poll-s S               seconds between state checks (default 30)
  --dry-run                print every gcloud command without running it
EOF
}

die() {
  echo "setup_tpu.sh: $*" >&2
  exit 2
}

GCLOUD=${GCLOUD:-gcloud}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CMD=create
if [[ $# -gt 0 && $1 != -* ]]; then
  CMD=$1
  shift
fi
case $CMD in
  create | install | verify | status | delete) ;;
  help) usage; exit 0 ;;
  *) die "unknown subcommand '$CMD'; use create, install, verify, status or delete (--help for options)." ;;
esac

NAME="" ZONE="" PROJECT="" ACCEL="v4-8" RUNTIME="" CAPACITY="spot" SHIP="scp" PYVER="3.11"
EXPECT_DEVICES="" MAX_RECREATES=5 RETRIES=3 RETRY_DELAY_S=10 POLL_S=30 DRY_RUN=0
while [[ $# -gt 0 ]]; do
  opt=$1
  if [[ $opt == --*=* ]]; then
    val=${opt#*=}
    opt=${opt%%=*}
  elif [[ $opt == --dry-run || $opt == -h || $opt == --help ]]; then
    val=""
  else
    [[ $# -ge 2 ]] || die "option $opt needs a value."
    val=$2
    shift
  fi
  shift
  case $opt in
    --name) NAME=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --runtime-version) RUNTIME=$val ;;
    --capacity) CAPACITY=$val ;;
    --ship) SHIP=$val ;;
    --python-version) PYVER=$val ;;
    --expect-devices) EXPECT_DEVICES=$val ;;
    --max-recreates) MAX_RECREATES=$val ;;
    --retries) RETRIES=$val ;;
    --retry-delay-s) RETRY_DELAY_S=$val ;;
    --poll-s) POLL_S=$val ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$opt' (--help lists the options)." ;;
  esac
done

[[ -n $NAME ]] || die "--name is required (the queued resource and TPU VM name)."
[[ -n $ZONE ]] || die "--zone is required (for example --zone=us-central2-b for TPU v4)."
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name=$NAME: use lowercase letters, digits and '-', starting with a letter."
case $CAPACITY in
  spot | on-demand | reserved) ;;
  *) die "--capacity=$CAPACITY: use spot, on-demand or reserved." ;;
esac
[[ $SHIP == scp || $SHIP == gs://*.tar.gz ]] || die "--ship=$SHIP: use scp or gs://BUCKET/PATH.tar.gz."
for n in MAX_RECREATES RETRIES RETRY_DELAY_S; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "--$(echo "$n" | tr '[:upper:]_' '[:lower:]-')=${!n}: expected a whole number."
done
[[ $POLL_S =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--poll-s=$POLL_S: expected a number of seconds."

# JAX devices a slice shows: v2/v3 one per TensorCore; v4/v5p one per chip of two TensorCores (megacore);
# v5e/v6e one TensorCore per chip. The number in the type counts TensorCores (v2-v5p) or chips (v5e, v6e).
expected_devices() {
  local n=${1##*-}
  [[ $n =~ ^[0-9]+$ ]] || { echo 0; return; }
  case $1 in
    v2-* | v3-*) echo "$n" ;;
    v4-* | v5p-*) echo $((n / 2)) ;;
    v5litepod-* | v5e-* | v6e-*) echo "$n" ;;
    *) echo 0 ;;
  esac
}
if [[ -z $EXPECT_DEVICES ]]; then
  EXPECT_DEVICES=$(expected_devices "$ACCEL")
fi
[[ $EXPECT_DEVICES =~ ^[0-9]+$ ]] || die "--expect-devices=$EXPECT_DEVICES: expected a whole number."
if [[ -z $RUNTIME ]]; then
  case $ACCEL in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

LOC=(--zone="$ZONE" --quiet)
[[ -n $PROJECT ]] && LOC+=(--project="$PROJECT")
SSH_OPTS=(--strict-host-key-checking=no) # a recreated VM keeps its name but has new host keys

log() { echo "setup_tpu.sh: $*"; }

# Every gcloud call goes through here, so that --dry-run shows all of them.
gc() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '[dry-run] gcloud'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  "$GCLOUD" "$@"
}

# retry DESCRIPTION COMMAND...: up to $RETRIES attempts, waiting RETRY_DELAY_S, twice that, ... between them.
retry() {
  local what=$1 attempt=1 delay=$RETRY_DELAY_S
  shift
  until "$@"; do
    if ((attempt >= RETRIES)); then
      echo "setup_tpu.sh: $what failed after $attempt attempts." >&2
      return 1
    fi
    log "$what failed (attempt $attempt of $RETRIES); retrying in ${delay}s."
    sleep "$delay"
    attempt=$((attempt + 1))
    delay=$((delay * 2))
  done
}

# Sets STATE to the queued resource's state, NOT_FOUND, or UNKNOWN when gcloud itself failed (network, auth).
# A dry run pretends: absent before `create`, ACTIVE after it, absent after `delete`.
STATE=""
DRY_STATE=ACTIVE
[[ $CMD == create ]] && DRY_STATE=NOT_FOUND
refresh_state() {
  if [[ $DRY_RUN == 1 ]]; then
    gc compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    STATE=$DRY_STATE
    return
  fi
  local out
  if out=$("$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>&1); then
    STATE=${out##*$'\n'}
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    STATE=NOT_FOUND
  else
    echo "setup_tpu.sh: gcloud describe failed: ${out##*$'\n'}" >&2
    STATE=UNKNOWN
  fi
}

create_qr() {
  local capacity=()
  case $CAPACITY in
    spot) capacity=(--spot) ;;
    reserved) capacity=(--reserved) ;;
  esac
  log "requesting $ACCEL ($CAPACITY) as queued resource '$NAME' in $ZONE, runtime $RUNTIME."
  gc compute tpus queued-resources create "$NAME" "${LOC[@]}" --node-id="$NAME" --accelerator-type="$ACCEL" \
    --runtime-version="$RUNTIME" "${capacity[@]}"
  DRY_STATE=ACTIVE
}

delete_qr() {
  refresh_state
  if [[ $STATE == NOT_FOUND ]]; then
    log "no queued resource '$NAME' in $ZONE: nothing to delete."
    return 0
  fi
  log "deleting queued resource '$NAME' ($STATE) and its TPU VMs."
  gc compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force
  DRY_STATE=NOT_FOUND
  refresh_state
  while [[ $STATE != NOT_FOUND ]]; do # deletion can take a minute; a create before it ends fails
    sleep "$POLL_S"
    refresh_state
  done
}

# Wait until ACTIVE. A FAILED request or a SUSPENDED (preempted) resource is deleted and requested again.
wait_active() {
  local last="" recreates=0
  while true; do
    refresh_state
    [[ $STATE != "$last" ]] && log "queued resource '$NAME': $STATE"
    last=$STATE
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND)
        if ((recreates >= MAX_RECREATES)); then
          echo "setup_tpu.sh: queued resource '$NAME' is $STATE after $recreates recreations; try another zone or" \
            "--capacity, or raise --max-recreates." >&2
          exit 1
        fi
        [[ $STATE != NOT_FOUND ]] && delete_qr
        recreates=$((recreates + 1))
        create_qr
        ;;
      *) sleep "$POLL_S" ;; # CREATING, ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING, UNKNOWN
    esac
  done
}

# Hosts a slice usually has, for --dry-run only (a real run counts the VM's network endpoints): 8 TensorCores
# per v2/v3 host, 4 chips per v4/v5p host, and v5e/v6e slices of up to 8 chips on one host, 4 chips per host above.
estimated_workers() {
  local devices
  devices=$(expected_devices "$ACCEL")
  case $ACCEL in
    v2-* | v3-*) echo $(((devices + 7) / 8)) ;;
    v5litepod-* | v5e-* | v6e-*) ((devices <= 8)) && echo 1 || echo $((devices / 4)) ;;
    *) echo $(((devices + 3) / 4)) ;;
  esac
}

# Number of TPU VM workers (hosts) of the slice: one JAX process runs on each.
WORKERS=""
worker_count() {
  if [[ $DRY_RUN == 1 ]]; then
    gc compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format=json
    WORKERS=$(estimated_workers)
    ((WORKERS >= 1)) || WORKERS=1
    log "[dry-run] assuming $WORKERS worker(s) for $ACCEL."
    return
  fi
  local json
  if ! json=$("$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format=json); then
    echo "setup_tpu.sh: cannot describe TPU VM '$NAME' (output above)." >&2
    exit 1
  fi
  WORKERS=$(printf '%s' "$json" | python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("networkEndpoints") or []))')
  if ((WORKERS < 1)); then
    echo "setup_tpu.sh: TPU VM '$NAME' lists no workers (networkEndpoints); is it READY?" >&2
    exit 1
  fi
}

ssh_all() {
  gc compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" "${SSH_OPTS[@]}" --worker=all --command="$1"
}

# The working tree (tracked and untracked files, not what git ignores) as one tarball.
pack() {
  local out=$1
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard --deduplicate |
      tar --null -T - --ignore-failed-read -czf "$out")
  else
    tar -C "$ROOT" --exclude=.git --exclude=workdir --exclude=__pycache__ --exclude='*.egg-info' -czf "$out" .
  fi
}

WORK_TMP=""
cleanup() { [[ -n $WORK_TMP ]] && rm -rf "$WORK_TMP"; return 0; }
trap cleanup EXIT

install_workers() {
  local tarball fetch=""
  WORK_TMP=$(mktemp -d)
  tarball=$WORK_TMP/lmtrain.tar.gz
  if [[ $DRY_RUN == 1 ]]; then
    log "[dry-run] would pack $ROOT into $tarball"
  else
    pack "$tarball"
  fi
  if [[ $SHIP == scp ]]; then
    retry "copying the code to the workers" \
      gc compute tpus tpu-vm scp "$tarball" "$NAME:lmtrain.tar.gz" "${LOC[@]}" "${SSH_OPTS[@]}" --worker=all
  else
    retry "uploading the code to $SHIP" gc storage cp "$tarball" "$SHIP"
    fetch="gcloud storage cp $(printf '%q' "$SHIP") ~/lmtrain.tar.gz"
  fi
  # Runs on every worker. unattended-upgrades holds the apt/dpkg lock in a new VM's first minutes (and can
  # restart services later), so it is stopped and removed before anything else.
  local script
  script=$(
    cat <<EOF
set -euo pipefail
sudo systemctl stop unattended-upgrades.service apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service >/dev/null 2>&1 || true
sudo systemctl disable unattended-upgrades.service apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q remove unattended-upgrades >/dev/null 2>&1 || true
${fetch}
rm -rf ~/lmtrain.new && mkdir -p ~/lmtrain.new && tar -xzf ~/lmtrain.tar.gz -C ~/lmtrain.new
rm -rf ~/lmtrain && mv ~/lmtrain.new ~/lmtrain
python3 -m pip --version >/dev/null 2>&1 || sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q install python3-pip
python3 -m pip install --user --quiet --upgrade uv
rm -rf ~/lmtrain-venv
python3 -m uv venv --quiet --python $(printf '%q' "$PYVER") ~/lmtrain-venv
python3 -m uv pip install --quiet --python ~/lmtrain-venv/bin/python -e "\$HOME/lmtrain[tpu]"
echo "LMTRAIN_INSTALLED \$(hostname)"
EOF
  )
  log "installing lmtrain with jax[tpu] on every worker (Python $PYVER virtualenv ~/lmtrain-venv)."
  retry "installing on the workers" ssh_all "$script"
}

# On every worker at once (a multi-host slice starts JAX only when all hosts join): the devices and
# processes JAX sees, through the same start-up as `lmtrain train`.
VERIFY_PY='
import sys
from lmtrain.parallel.mesh import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
want_devices, want_processes = int(sys.argv[1]), int(sys.argv[2])
devices, processes = jax.device_count(), jax.process_count()
ok = (want_devices == 0 or devices == want_devices) and processes == want_processes
verdict = "ok" if ok else "MISMATCH"
expected = want_devices or "any"
print(f"LMTRAIN_VERIFY {verdict} process {jax.process_index()}: {devices} devices "
      f"({jax.local_device_count()} local, {jax.devices()[0].device_kind}), {processes} processes; "
      f"expected {expected} devices, {want_processes} processes", flush=True)
sys.exit(0 if ok else 1)
'

verify_workers() {
  worker_count
  local env="" out
  ((WORKERS > 1)) && env="JAX_NUM_PROCESSES=$WORKERS "
  local cmd
  cmd="cd ~ && ${env}~/lmtrain-venv/bin/python -c $(printf '%q' "$VERIFY_PY") $EXPECT_DEVICES $WORKERS"
  local want=$EXPECT_DEVICES
  ((want == 0)) && want="any number of"
  log "verifying JAX on $WORKERS worker(s): expecting $want devices and $WORKERS processes."
  if [[ $DRY_RUN == 1 ]]; then
    ssh_all "$cmd"
    return 0
  fi
  local attempt ok_count
  for ((attempt = 1; attempt <= RETRIES; attempt++)); do
    out=$(ssh_all "$cmd" 2>&1) || true
    grep '^LMTRAIN_VERIFY' <<<"$out" || true
    ok_count=$(grep -c '^LMTRAIN_VERIFY ok' <<<"$out" || true)
    if ((ok_count == WORKERS)); then
      log "verified: $WORKERS worker(s) agree."
      return 0
    fi
    log "verification: $ok_count of $WORKERS worker(s) ok (attempt $attempt of $RETRIES)."
    sleep "$RETRY_DELAY_S"
  done
  echo "$out" | tail -n 30 >&2
  echo "setup_tpu.sh: JAX on '$NAME' does not show the expected devices/processes (output above)." >&2
  exit 1
}

next_steps() {
  local loc="--name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}"
  local env=""
  ((${WORKERS:-1} > 1)) && env="JAX_NUM_PROCESSES=$WORKERS "
  cat <<EOF

Ready. Next, train with a gs:// WORKDIR so that checkpoints outlive the VMs; the launcher relaunches after a
preemption and resumes from the latest checkpoint:

  lmtrain launch run $loc --accelerator-type=$ACCEL --capacity=$CAPACITY \\
      --workdir=gs://YOUR_BUCKET/runs/llama_1b -- --config=llama_1b

or start it by hand on every worker (no relaunch after a preemption):

  gcloud compute tpus tpu-vm ssh $NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT} --worker=all \\
      --command='${env}~/lmtrain-venv/bin/python -m lmtrain.cli train --config=llama_1b --workdir=gs://YOUR_BUCKET/runs/llama_1b'

When the run is done, stop paying for the TPU:

  bash setup_tpu.sh delete $loc
EOF
}

case $CMD in
  create)
    refresh_state
    if [[ $STATE == ACTIVE ]]; then
      log "queued resource '$NAME' already exists and is ACTIVE; installing on it."
    elif [[ $STATE == NOT_FOUND ]]; then
      create_qr
    fi
    wait_active
    install_workers
    verify_workers
    next_steps
    ;;
  install)
    refresh_state
    if [[ $STATE != ACTIVE ]]; then
      echo "setup_tpu.sh: queued resource '$NAME' is $STATE, not ACTIVE; run 'bash setup_tpu.sh create' first." >&2
      exit 1
    fi
    install_workers
    verify_workers
    next_steps
    ;;
  verify) verify_workers ;;
  status)
    refresh_state
    echo "$NAME $ZONE $STATE"
    ;;
  delete) delete_qr ;;
esac
