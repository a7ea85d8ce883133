#!/usr/bin/env bash
# Builds the Ambit image (daemonset/Dockerfile, one image for ambit-agent and ambit-controller) on a Debian machine
# from nothing, and optionally checks it (scripts/image_check.py).
#
# - Builder: the Docker daemon DOCKER_HOST (or /var/run/docker.sock) names, if one answers. Otherwise Debian's
#   docker.io is installed and a private dockerd is started for this run (socket /run/ambit-image/docker.sock, data
#   root /var/lib/ambit-image/docker, which keeps the image and the build cache between runs), without a bridge or
#   iptables rules: builds and checks use the host's network namespace or ones of their own, so the host's firewall
#   is left as it was. The daemon is stopped on exit unless --keep-daemon (a later run uses the kept one).
# - Base: debian:bookworm-slim from the daemon's images, else pulled from the registry, else (no registry, as on the
#   project's machines) made with debootstrap the way Debian's official images are (debuerreotype: minbase, the
#   "slim" dpkg path excludes, apt's docker-clean settings, bookworm + updates + security sources, upgraded).
# - Build: BuildKit (buildx, or Debian's docker CLI 20.10 with DOCKER_BUILDKIT=1), since the Dockerfile uses
#   `RUN --mount=type=secret`. The host's CA bundle goes in as the secret `ca-bundle`, so pip trusts a network that
#   intercepts TLS; it is in no layer of the image.
#
# Usage: scripts/build-image.sh [-t TAG] [--base auto|registry|debootstrap] [--check] [--save FILE.tar.gz]
#                               [--keep-daemon] [--purge]
# Environment: AMBIT_IMAGE (tag, default ambit:dev), AMBIT_IMAGE_BASE (as --base), AMBIT_BUILD_CA_BUNDLE (CA file
# for pip in the build; default the system bundle; empty: none), DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR,
# AMBIT_DOCKER_STORAGE_DRIVER (the private daemon's; default: dockerd's choice, overlay2 on this project's machines;
# vfs where the data root's filesystem cannot hold overlay layers, such as inside a container: not tried here).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${AMBIT_IMAGE:-ambit:dev}
BASE_MODE=${AMBIT_IMAGE_BASE:-auto}
BASE=debian:bookworm-slim
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CA_BUNDLE=${AMBIT_BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
STATE=/var/lib/ambit-image
RUNDIR=/run/ambit-image
SOCK=$RUNDIR/docker.sock
PIDFILE=$RUNDIR/dockerd.pid
CHECK=0
KEEP=0
SAVE=
PURGE=0

say() { printf '\033[1m[build-image]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[build-image] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    -t|--tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --base) BASE_MODE=${2:?--base needs a value}; shift 2 ;;
    --check) CHECK=1; shift ;;
    --save) SAVE=${2:?--save needs a file}; shift 2 ;;
    --keep-daemon) KEEP=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case "$BASE_MODE" in auto|registry|debootstrap) ;; *) die "--base must be auto, registry or debootstrap" ;; esac
grep -qE "^FROM $BASE( AS [a-z]+)?$" daemonset/Dockerfile \
  || die "daemonset/Dockerfile no longer starts FROM $BASE: update BASE here"

# --- timing ------------------------------------------------------------------------------------------------------
TIMINGS=()
STEP_NAME=
STEP_START=0
step() {  # step NAME: ends the previous step's clock and starts one for NAME
  local now; now=$(date +%s)
  [ -z "$STEP_NAME" ] || TIMINGS+=("$(printf '%-34s %4ss' "$STEP_NAME" $((now - STEP_START)))")
  STEP_NAME=$1; STEP_START=$now
  [ -z "$1" ] || say "$1"
}
START=$(date +%s)
report_timings() {
  [ -n "$STEP_NAME" ] && step ""
  [ ${#TIMINGS[@]} -gt 0 ] || return 0
  for t in "${TIMINGS[@]}"; do say "  $t"; done
  say "  $(printf '%-34s %4ss' total $(( $(date +%s) - START )))"
}

# --- cleanup ------------------------------------------------------------------------------------------------------
OWN_DAEMON=0
ROOTFS=
STAGE=
cleanup() {
  local rc=$?
  [ -z "$STAGE" ] || docker rm -f "$STAGE" >/dev/null 2>&1 || true
  if [ -n "$ROOTFS" ] && [ -d "$ROOTFS" ]; then
    # debootstrap mounts /proc and /sys in the target while it runs; an interrupted one can leave them.
    grep -o " $ROOTFS/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$ROOTFS"
  fi
  if [ "$OWN_DAEMON" = 1 ] && [ "$KEEP" = 0 ]; then stop_daemon; fi
  report_timings
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (try: sudo $0)"; }

apt_install() {  # apt_install PACKAGE...: Debian packages, once
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  need_root "installing ${missing[*]}"
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- the daemon -----------------------------------------------------------------------------------------------------
daemon_pid() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }

stop_daemon() {
  local pid
  pid=$(daemon_pid) || return 0
  say "stopping the private dockerd (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then say "dockerd did not stop in 30 s; killing it"; kill -KILL "$pid"; fi
  # A daemon killed mid-way can leave its layer and namespace mounts: none may outlive it.
  grep -oE " ($STATE|$RUNDIR)/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -f "$PIDFILE" "$SOCK"
}

start_daemon() {
  need_root "starting a private dockerd"
  apt_install docker.io
  mkdir -p "$RUNDIR" "$STATE"
  if ! daemon_pid >/dev/null; then
    local driver=()
    [ -z "${AMBIT_DOCKER_STORAGE_DRIVER:-}" ] || driver=(--storage-driver "$AMBIT_DOCKER_STORAGE_DRIVER")
    say "starting a private dockerd (data root $STATE/docker, log $RUNDIR/dockerd.log)"
    # setsid: the daemon must not get the terminal's SIGINT before this script has stopped it in order.
    setsid /usr/sbin/dockerd --host "unix://$SOCK" --data-root "$STATE/docker" --exec-root "$RUNDIR/exec" \
      --pidfile "$PIDFILE" --bridge=none --iptables=false --ip6tables=false "${driver[@]}" \
      >"$RUNDIR/dockerd.log" 2>&1 < /dev/null 9>&- &
  fi
  OWN_DAEMON=1
  export DOCKER_HOST="unix://$SOCK"
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && return; sleep 0.5; done
  tail -20 "$RUNDIR/dockerd.log" >&2 || true
  die "the private dockerd did not answer within 60 s (log above: $RUNDIR/dockerd.log)"
}

if [ "$PURGE" = 1 ]; then
  need_root "--purge"
  stop_daemon
  rm -rf --one-file-system "$STATE" "$RUNDIR"
  say "removed $STATE (the private daemon's images and build cache) and $RUNDIR"
  exit 0
fi

step "builder"
mkdir -p "$RUNDIR" 2>/dev/null || true
if [ -d "$RUNDIR" ] && [ -w "$RUNDIR" ]; then
  exec 9>"$RUNDIR/lock"
  flock -n 9 || die "another scripts/build-image.sh is running (lock $RUNDIR/lock)"
fi
if command -v docker >/dev/null && [ "${DOCKER_HOST:-unix://$SOCK}" = "unix://$SOCK" ] && daemon_pid >/dev/null; then
  export DOCKER_HOST="unix://$SOCK"  # a private daemon kept by an earlier --keep-daemon: stopped as ours
  OWN_DAEMON=1
  say "using the private dockerd kept running earlier"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  say "using the Docker daemon at ${DOCKER_HOST:-/var/run/docker.sock}"
else
  start_daemon
fi
# A daemon without a bridge (the private one) builds in the host's network namespace (its resolver, its proxies).
NET=()
docker network inspect bridge >/dev/null 2>&1 || NET=(--network host)

# A BuildKit client: buildx where installed (Docker >= 23 builds with it), else a CLI from before 23 that has
# BuildKit built in (Debian's docker.io). Docker 23's CLI without buildx has only the legacy builder, which cannot
# read `RUN --mount`.
BUILD=()
if docker buildx version >/dev/null 2>&1; then
  BUILD=(docker buildx build --load)
else
  for cli in docker /usr/bin/docker; do
    command -v "$cli" >/dev/null || continue
    v=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null || true)
    if [ -n "$v" ] && [ "${v%%.*}" -lt 23 ] 2>/dev/null; then BUILD=(env DOCKER_BUILDKIT=1 "$cli" build); break; fi
  done
fi
[ ${#BUILD[@]} -gt 0 ] || die "no BuildKit-capable docker CLI: install the buildx plugin (docker-buildx-plugin, or \
Debian's docker-buildx) or Debian's docker.io (its CLI has BuildKit built in)"

# --- the base image -------------------------------------------------------------------------------------------------
make_base() {
  need_root "debootstrap"
  apt_install debootstrap
  ROOTFS=$(mktemp -d /var/tmp/ambit-base.XXXXXX)
  chmod 755 "$ROOTFS"
  say "debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase --components=main "$SUITE" "$ROOTFS" "$MIRROR" > "$RUNDIR/debootstrap.log" 2>&1 \
    || { tail -20 "$RUNDIR/debootstrap.log" >&2; die "debootstrap failed (log above: $RUNDIR/debootstrap.log)"; }

  # What Debian's official images set (debuerreotype's minimizing-config): no services started by installs, no apt
  # caches left in layers, compressed indexes, no translations.
  printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
  chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
  echo force-unsafe-io > "$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  local clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
  cat > "$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<EOF
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::GzipIndexes "true";' > "$ROOTFS/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' > "$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' > "$ROOTFS/etc/apt/apt.conf.d/docker-autoremove-suggests"

  # The official image's sources: the release, its updates and its security fixes.
  rm -f "$ROOTFS/etc/apt/sources.list"
  cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

  # "slim": documentation, manuals and translations removed, and kept out of later installs by dpkg's path
  # excludes (copyright files stay, as Debian's licences ask).
  local excludes=('/usr/share/doc/*' '/usr/share/groff/*' '/usr/share/info/*' '/usr/share/linda/*'
                  '/usr/share/lintian/overrides/*' '/usr/share/locale/*' '/usr/share/man/*')  # quoted: dpkg's globs
  {
    echo '# The "slim" variant: files normally unneeded in containers are excluded, as in debian:*-slim.'
    for e in "${excludes[@]}"; do echo "path-exclude $e"; done
    echo 'path-include /usr/share/doc/*/copyright'
    echo 'path-include /usr/share/locale/locale.alias'
  } > "$ROOTFS/etc/dpkg/dpkg.cfg.d/docker"
  local e
  for e in "${excludes[@]}"; do
    local dir="$ROOTFS${e%/\*}"
    [ -d "$dir" ] || continue
    find "$dir" -mindepth 1 -depth -not -path "$ROOTFS/usr/share/doc/*/copyright" \
      -not -path "$ROOTFS/usr/share/locale/locale.alias" \( -not -type d -o -empty \) -delete
  done
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/var/log/dpkg.log "$ROOTFS"/var/log/bootstrap.log "$ROOTFS"/var/log/alternatives.log \
    "$ROOTFS"/var/cache/ldconfig/aux-cache "$ROOTFS"/run/mount/utab

  local label="org.opencontainers.image.description=\"Debian $SUITE slim, made with debootstrap by scripts/build-image.sh\""
  local stage="ambit-base-stage:$SUITE"
  tar -C "$ROOTFS" --numeric-owner -c . | docker import --change "LABEL $label" - "$stage" >/dev/null
  rm -rf --one-file-system "$ROOTFS"; ROOTFS=

  # Security and point-release updates, as the official image has them when built; then flattened to one layer.
  say "upgrading the base from $SUITE-updates and $SUITE-security"
  STAGE=ambit-base-upgrade-$$
  docker run --name "$STAGE" "${NET[@]}" "$stage" sh -c \
    'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null && rm -rf /var/lib/apt/lists/*'
  docker export "$STAGE" | docker import --change "LABEL $label" --change 'CMD ["bash"]' - "$BASE" >/dev/null
  docker rm -f "$STAGE" >/dev/null; STAGE=
  docker rmi "$stage" >/dev/null
}

step "base image $BASE"
if [ "$BASE_MODE" != debootstrap ] && docker image inspect "$BASE" >/dev/null 2>&1; then
  say "$BASE is in the daemon already ($(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.description"}}' "$BASE" 2>/dev/null || true))"
elif [ "$BASE_MODE" = debootstrap ]; then
  make_base
elif timeout 180 docker pull "$BASE"; then
  :
elif [ "$BASE_MODE" = registry ]; then
  die "cannot pull $BASE (--base registry)"
else
  say "cannot pull $BASE: making it with debootstrap"
  make_base
fi

# --- the image ------------------------------------------------------------------------------------------------------
step "docker build $TAG"
SECRET=()
if [ -n "$CA_BUNDLE" ]; then
  [ -s "$CA_BUNDLE" ] || die "AMBIT_BUILD_CA_BUNDLE=$CA_BUNDLE is not a file (set it empty for none)"
  SECRET=(--secret "id=ca-bundle,src=$CA_BUNDLE")
fi
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || REVISION="$REVISION-dirty"
"${BUILD[@]}" "${NET[@]}" "${SECRET[@]}" --progress plain -f daemonset/Dockerfile -t "$TAG" \
  --label "org.opencontainers.image.revision=$REVISION" \
  --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
SIZE=$(docker image inspect -f '{{.Size}}' "$TAG")

if [ -n "$SAVE" ]; then
  step "docker save $SAVE"
  docker save "$TAG" | gzip -1 > "$SAVE"
  say "saved $TAG to $SAVE ($(du -h "$SAVE" | cut -f1)); load it with: docker load -i $SAVE"
fi

if [ "$CHECK" = 1 ]; then
  step "image check"
  PY=python3
  [ ! -x .venv/bin/python ] || PY=.venv/bin/python
  "$PY" scripts/image_check.py --image "$TAG"
fi

say "built $TAG: $((SIZE / 1000000)) MB, revision $REVISION"
