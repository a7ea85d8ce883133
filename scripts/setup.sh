#!/usr/bin/env bash
# One-command, idempotent bootstrap for a fresh Debian machine (run as root).
# Installs the kernel toolchain (BCC, bpftool, headers), the traffic tools the tests and benchmarks use,
# links kernel headers where BCC looks for them, mounts bpffs, builds .venv and makes `bcc` importable in it
# without putting all of Debian's dist-packages on sys.path. Stops with a clear message when the kernel lacks
# something Ambit needs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
STAMP=.venv/.ambit-setup-stamp

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] ERROR:\033[0m %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, eBPF and apt need it); try: sudo make setup"
[ "$(uname -s)" = Linux ] || die "Ambit needs Linux (found $(uname -s))"

APT_PKGS=(python3-bpfcc bpftool iproute2 linux-headers-amd64 iperf3 tshark curl nghttp2-client ethtool
          tcpdump procps util-linux psmisc protobuf-compiler nftables gcc)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against kernel headers; none ship for this kernel, so point it at Debian's newest ones
# (our programs only use networking UAPI, which is stable).
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build/include" ]; then
  H=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$H" ] || die "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64"
  say "linking kernel headers $H for $K"
  mkdir -p "/lib/modules/$K"
  ln -sfn "$H" "/lib/modules/$K/build"
  ln -sfn "${H%-amd64}-common" "/lib/modules/$K/source"
fi

mountpoint -q /sys/fs/bpf || { say "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

# Kernel capability checks: stop early with the precise missing piece.
[ -e /sys/kernel/btf/vmlinux ] || say "warning: no BTF at /sys/kernel/btf/vmlinux (not required by BCC)"
ip netns add ambit-setup-probe 2>/dev/null || die "network namespaces unavailable (ip netns add failed)"
if ! ip netns exec ambit-setup-probe ip link add ambit-probe0 type veth peer name ambit-probe1 2>/dev/null; then
  ip netns del ambit-setup-probe; die "veth links unavailable"
fi
if ! ip netns exec ambit-setup-probe tc qdisc add dev ambit-probe0 clsact 2>/dev/null; then
  ip netns del ambit-setup-probe; die "tc clsact qdisc unavailable (CONFIG_NET_SCH_INGRESS)"
fi
ip netns del ambit-setup-probe
bpftool prog show >/dev/null 2>&1 || die "the bpf() syscall is unavailable (bpftool prog show failed)"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  say "installing ambit (editable, dev extra) into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  touch "$STAMP"
fi

# Make Debian's BCC (pure Python over libbcc.so) importable without Debian's whole dist-packages.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/bcc-only
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-only/bcc
echo "$ROOT/.venv/bcc-only" > "$SITE/ambit-bcc.pth"
.venv/bin/python -c 'import bcc' 2>/dev/null || die "bcc is not importable in .venv (python3-bpfcc installed?)"
.venv/bin/python - <<'PY' || die "BCC cannot compile and load a trivial program (kernel headers or BPF syscall)"
from bcc import BPF
b = BPF(text="int f(struct __sk_buff *skb) { return 0; }")
b.load_func("f", BPF.SCHED_CLS)
PY
command -v .venv/bin/envoy >/dev/null || [ -x .venv/bin/envoy ] || say "warning: envoy binary not found in .venv/bin"
say "ready"
