"""Check a built Ambit image the way daemonset/base runs it, on this machine.

Why: the image is what a cluster runs, and nothing else in `make test` starts it. Each check runs the image through
the Docker CLI (DOCKER_HOST names the daemon) and fails with the command's output:

1. the entry point (ambit-agent), ambit-controller and ambitctl answer ``--help``;
2. the tools the agent, the docs and the manifests rely on are there (nft, tc, ip, nsenter, modprobe, xz, tar,
   bpftool, sleep), and the code's bytecode was compiled at build time;
3. ``bcc`` imports in the image's venv from Debian's python3-bpfcc through the .pth directory, without Debian's whole
   dist-packages on sys.path;
4. the controller starts as the Deployment runs it (uid 1337, read-only root filesystem, every capability dropped,
   no-new-privileges, the CA on a tmpfs, xDS over TLS only) and is ready;
5. an agent starts as the DaemonSet runs it (privileged; bpffs, /var/lib/ambit, and the host's /lib/modules and
   /usr/src read-only mounted from the host; TLS to the controller with the root certificate and a node token),
   compiles and loads its eBPF program with BCC, attaches it to an uplink and to two enrolled pods' interfaces,
   writes its nftables table, gets certificates, and is ready;
6. stopped, it leaves capture attached, and a new container adopts the pinned programs and maps (an upgrade);
7. SIGTERM stops it (PID 1) with exit code 0 after its drain;
8. daemonset/cleanup's `ambit-agent --cleanup` from the image removes its filters, pins, nftables table and state,
   and SIGTERM stops the controller with exit code 0;
9. the lab (`ambitctl lab up --mesh`, examples/basic: a controller and two nodes' agents) runs with the controller
   and agents from the image, each in its lab namespace, the node's bpffs shared as the DaemonSet shares it, and
   carries a pod's HTTP requests to a pod on the other node (HBONE, mTLS) and to a Service's VIP.

Checks 4-8 run in a network namespace of Docker's making (``--network none``, shared by the containers), with a
veth uplink and pod veths the agent's container creates inside it: nothing is attached to the host's interfaces, and
the namespace goes with the containers. The node's bpffs is a bpffs instance the check mounts in its own temporary
directory and unmounts at the end, so no pin is left on the host whatever happens.

For 9 the lab's own code runs from the project venv, through a view of it (a directory with the venv's
pyvenv.cfg and lib/) whose bin/ holds ambit-controller and ambit-agent wrappers that run the image: the lab starts
the console scripts beside its interpreter, so it starts the image's without a change to the lab.

Needs root, the Docker daemon, the project venv, and the host's kernel headers linked at
/lib/modules/$(uname -r)/build (`make setup` does both).
Usage: python scripts/image_check.py --image ambit:dev   (scripts/build-image.sh --check runs it; `make image-test`)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE = "node1"
TOKEN = "image-check-node-token"
PODS = {"client": "10.244.1.10", "server": "10.244.1.11"}
CONTROLLER_UID = 1337
READY_TIMEOUT = 90.0
# Capability numbers as in linux/capability.h: the ones a --privileged container needs the caller to hold.
CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)


class CheckFailed(Exception):
    """One check's failure, with what to look at."""


def docker(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the Docker CLI; a failure carries the command and both outputs."""
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise CheckFailed(f"docker {' '.join(args)}: no answer in {timeout:.0f}s") from e
    if check and proc.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def missing_capabilities(bounding: int, last: int) -> list[str]:
    """Docker's names of the kernel's capabilities (0..last) that the bounding set ``bounding`` lacks."""
    return [CAPABILITIES[i] if i < len(CAPABILITIES) else str(i) for i in range(last + 1) if not bounding >> i & 1]


def privileged_args() -> tuple[list[str], str]:
    """``--privileged`` as the DaemonSet asks, or, where this process's bounding set lacks capabilities (a sandbox
    may withhold some, and runc then refuses --privileged with "unable to apply caps"), its equivalent minus those:
    every other capability, no seccomp or AppArmor profile, and /proc and /sys unmasked and writable."""
    bounding = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bounding = int(line.split()[1], 16)
    missing = missing_capabilities(bounding, int(Path("/proc/sys/kernel/cap_last_cap").read_text()))
    if not missing:
        return ["--privileged"], "privileged"
    args = ["--cap-add", "ALL"]
    for cap in missing:
        args += ["--cap-drop", cap]
    args += ["--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]
    args += ["--security-opt", "systempaths=unconfined"]
    return args, f"privileged less {','.join(missing)} (not in this machine's bounding set)"


def http_status(container: str, port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path from inside a container of the check's namespace (the image has no curl)."""
    code = (
        "import sys, urllib.error, urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=3)\n"
        "    print(r.status, r.read().decode()[:500])\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode()[:500])\n"
        "except OSError as e:\n"
        "    print(0, e)\n"
    )
    out = docker("exec", container, "python", "-c", code, check=False, timeout=30).stdout.strip()
    status, _, body = out.partition(" ")
    return (int(status) if status.isdigit() else 0), body


def wait_ready(container: str, port: int, timeout: float = READY_TIMEOUT) -> None:
    """Poll /healthz/ready until 200, failing at once with the log if the container exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        if state != "true":
            raise CheckFailed(f"{container} exited before it was ready; log:\n{logs(container)}")
        status, body = http_status(container, port, "/healthz/ready")
        if status == 200:
            return
        last = f"{status} {body}"
        time.sleep(1.0)
    raise CheckFailed(f"{container} not ready after {timeout:.0f}s ({last}); log:\n{logs(container)}")


def logs(container: str, lines: int = 40) -> str:
    proc = docker("logs", "--tail", str(lines), container, check=False)
    return proc.stdout + proc.stderr


def write_config(work: Path) -> Path:
    """A namespace enrolled in the mesh, the node and two of its pods: the agent has two workloads to capture."""
    config = work / "config"
    config.mkdir()
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n",
        f"apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\nspec:\n  podCIDR: 10.244.1.0/24\n",
    ]
    for name, ip in PODS.items():
        docs.append(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  nodeName: {NODE}\n"
            f"  serviceAccountName: {name}\nstatus:\n  podIP: {ip}\n"
        )
    (config / "cluster.yaml").write_text("---\n".join(docs))
    creds = work / "creds"
    creds.mkdir()
    (creds / "node-tokens.json").write_text(f'{{"{NODE}": "{TOKEN}"}}')
    (creds / "token").write_text(TOKEN)
    for path in (work, config, creds, *config.iterdir(), *creds.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # read by the controller's uid
    return work


class ImageCheck:
    """The checks, in order; each records PASS or FAIL with its reason, and the containers are removed at the end."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.prefix = f"ambit-imgchk-{os.getpid()}"
        self.controller = f"{self.prefix}-controller"
        self.agent = f"{self.prefix}-agent"
        self.lab = ""
        self.results: list[tuple[str, bool, str]] = []
        self.work = Path(tempfile.mkdtemp(prefix="ambit-imgchk."))
        self.bpffs = self.work / "bpffs"
        self.bpffs_mounted = False
        self.priv, self.how = privileged_args()

    def run(self, name: str, check: Callable[[], str]) -> bool:
        start = time.monotonic()
        try:
            detail = check()
        except CheckFailed as e:
            self.results.append((name, False, str(e)))
            print(f"FAIL {name} ({time.monotonic() - start:.1f}s)\n{e}", flush=True)
            return False
        self.results.append((name, True, detail))
        print(f"PASS {name} ({time.monotonic() - start:.1f}s): {detail}", flush=True)
        return True

    def entry_points(self) -> str:
        seen = []
        for entry in ("", "ambit-controller", "ambitctl"):  # ambit-waypoint is a stub that says so and exits 1
            args = ["run", "--rm", "--network", "none"] + (["--entrypoint", entry] if entry else [])
            out = docker(*args, self.image, "--help").stdout
            expected = f"usage: {entry or 'ambit-agent'}"
            if expected not in out:
                raise CheckFailed(f"{entry or 'the entry point'} --help did not print {expected!r}:\n{out[:500]}")
            seen.append(entry or "ambit-agent (entry point)")
        return ", ".join(seen)

    def tools(self) -> str:
        tools = "nft tc ip nsenter modprobe xz tar bpftool sleep"
        script = (
            f"for t in {tools}; do command -v $t >/dev/null || echo missing: $t; done; "
            "for m in agent/main controller/main cli/ambitctl; do "
            "ls /opt/ambit/$(dirname $m)/__pycache__/$(basename $m).cpython-*.pyc >/dev/null 2>&1 "
            "|| echo no bytecode: $m; done"
        )
        out = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", self.image, "-c", script).stdout
        if out.strip():
            raise CheckFailed(out)
        return f"{tools}; bytecode compiled"

    def bcc(self) -> str:
        code = (
            "import sys, bcc\n"
            "print(bcc.__file__)\n"
            "print(any(p.rstrip('/').endswith('dist-packages') for p in sys.path))\n"
        )
        out = docker("run", "--rm", "--network", "none", "--entrypoint", "python", self.image, "-c", code).stdout
        lines = out.split()
        if len(lines) != 2 or lines[0] != "/opt/ambit/.venv/bcc-only/bcc/__init__.py" or lines[1] != "False":
            raise CheckFailed(f"bcc should come from /opt/ambit/.venv/bcc-only alone, got:\n{out}")
        return lines[0]

    def controller_ready(self) -> str:
        write_config(self.work)
        docker(
            "run", "-d", "--name", self.controller, "--network", "none",
            "--user", str(CONTROLLER_UID), "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--tmpfs", f"/var/run/ambit/ca:uid={CONTROLLER_UID},mode=0700",
            "--tmpfs", f"/var/lib/ambit-controller:uid={CONTROLLER_UID}",
            "-v", f"{self.work / 'config'}:/etc/ambit/config:ro",
            "-v", f"{self.work / 'creds'}:/etc/ambit/creds:ro",
            "--entrypoint", "ambit-controller", self.image,
            "--config-dir=/etc/ambit/config", "--state-dir=/var/lib/ambit-controller/state",
            "--xds-port=0", "--tls-port=15012", "--monitoring-port=15014", "--ca-dir=/var/run/ambit/ca",
            "--node-tokens=/etc/ambit/creds/node-tokens.json",
        )  # fmt: skip
        wait_ready(self.controller, 15014)
        root = docker("exec", self.controller, "cat", "/var/run/ambit/ca/root-cert.pem").stdout
        if "BEGIN CERTIFICATE" not in root:
            raise CheckFailed(f"the controller wrote no root certificate:\n{root[:300]}")
        (self.work / "creds" / "root-cert.pem").write_text(root)
        (self.work / "creds" / "root-cert.pem").chmod(0o644)
        return f"uid {CONTROLLER_UID}, read-only root, no capabilities; ready on 15014, TLS on 15012"

    def agent_ready(self) -> str:
        build = Path("/lib/modules") / platform.release() / "build" / "include"
        if not build.is_dir():
            raise CheckFailed(f"no kernel headers at {build} on this host: run `make setup` (it links them)")
        # The node's bpffs and /var/lib as the DaemonSet mounts them (hostPath): a bpffs instance of the check's own
        # on the host, so pins outlive the container as they outlive the pod, and vanish when it is unmounted.
        self.bpffs.mkdir(mode=0o700)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True, capture_output=True)
        self.bpffs_mounted = True
        (self.work / "var-lib" / "ambit").mkdir(parents=True)
        self.start_agent()
        wait_ready(self.agent, 15021)
        log = logs(self.agent, 200)
        for line in ("capture started", "certificate issued", "DNAT capture installed"):
            if line not in log:
                raise CheckFailed(f"ready, but the agent's log has no {line!r}:\n{log}")
        self.expect_filters(present=True)
        docker("exec", self.agent, "nft", "list", "table", "inet", "ambit_default")
        pins = sorted(p.name for p in (self.bpffs / "ambit" / "default").iterdir())
        return f"{self.how}; eBPF compiled and attached to up0, pod0, pod1 ({len(pins)} pins); nftables; certs; ready"

    def start_agent(self) -> None:
        """The DaemonSet's container: its mounts, env and args, with TLS to the check's controller."""
        # The node's network as the agent finds it: an uplink with the default route, and a veth per local pod
        # with its /32 route (as a CNI leaves them), in the namespace the two containers share. Made once: a
        # restarted container finds them, as a restarted pod finds the node's.
        pods = " ".join(PODS.values())
        setup = (
            "set -e; if ! ip link show up0 >/dev/null 2>&1; then "
            "ip link add up0 type veth peer name up1; ip addr add 10.99.0.2/24 dev up0; "
            "ip link set up0 up; ip link set up1 up; ip route add default via 10.99.0.1; "
            f"n=0; for ip in {pods}; do ip link add pod$n type veth peer name pod${{n}}p; "
            "ip link set pod$n up; ip link set pod${n}p up; ip route add $ip/32 dev pod$n; n=$((n+1)); done; fi; "
            'exec ambit-agent "$@"'
        )
        docker(
            "run", "-d", "--name", self.agent, "--network", f"container:{self.controller}", *self.priv,
            "-v", f"{self.bpffs}:/sys/fs/bpf", "-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro",
            "-v", f"{self.work / 'var-lib' / 'ambit'}:/var/lib/ambit",
            "-v", f"{self.work / 'creds'}:/var/run/ambit/creds:ro",
            "-e", f"AMBIT_NODE={NODE}", "-e", "AMBIT_LOG_LEVEL=info",
            "--entrypoint", "sh", self.image, "-c", setup, "ambit-agent",
            "--controller=127.0.0.1:15012", "--root-cert=/var/run/ambit/creds/root-cert.pem",
            "--token-file=/var/run/ambit/creds/token", "--state-dir=/var/lib/ambit",
        )  # fmt: skip

    def expect_filters(self, present: bool) -> None:
        for dev in ("up0", "pod0", "pod1"):
            tc = docker("exec", self.controller, "tc", "filter", "show", "dev", dev, "ingress", check=False).stdout
            if ("ambit:default" in tc and "direct-action" in tc) != present:
                state = "no capture filter" if present else "a capture filter left"
                raise CheckFailed(f"{state} at tc ingress of {dev}:\n{tc}")

    def restart(self) -> str:
        """What every agent upgrade does: a new container adopts the pinned programs and maps (reopening maps by id
        needs CAP_SYS_ADMIN, one reason the DaemonSet is privileged), while capture stays attached in between."""
        docker("stop", "-t", "30", self.agent, timeout=60)
        self.expect_filters(present=True)  # fail closed with no agent: the filters outlive it
        docker("rm", self.agent)
        self.start_agent()
        wait_ready(self.agent, 15021)
        started = [line for line in logs(self.agent, 200).splitlines() if '"msg":"capture started"' in line]
        if not started or '"adopted":[]' in started[-1]:
            raise CheckFailed(f"the new agent did not adopt the pinned capture: {started}")
        adopted = json.loads(started[-1])["adopted"]
        return f"capture stayed attached while stopped; the new agent adopted {', '.join(adopted)}"

    def sigterm(self) -> str:
        docker("stop", "-t", "30", self.agent, timeout=60)
        code = docker("inspect", "-f", "{{.State.ExitCode}}", self.agent).stdout.strip()
        if code != "0" or '"msg":"stopped"' not in logs(self.agent):
            raise CheckFailed(
                f"the agent exited {code} on SIGTERM, or without its drained stop; log:\n{logs(self.agent)}"
            )
        return "the agent drained and exited 0"

    def cleanup(self) -> str:
        """daemonset/cleanup's init container, on the node the agent left: its mounts and args."""
        out = docker(
            "run", "--rm", "--network", f"container:{self.controller}", *self.priv,
            "-v", f"{self.bpffs}:/sys/fs/bpf", "-v", f"{self.work / 'var-lib'}:/host/var/lib",
            "-e", "AMBIT_LOG_LEVEL=info", "--entrypoint", "ambit-agent", self.image,
            "--cleanup", "--state-dir=/host/var/lib/ambit",
        )  # fmt: skip
        log = out.stdout + out.stderr
        if '"msg":"cleanup done"' not in log:
            raise CheckFailed(f"no 'cleanup done':\n{log}")
        self.expect_filters(present=False)
        # bpffs shows the kernel's own progs.debug and maps.debug at its root (CONFIG_BPF_PRELOAD): not pins.
        pins = [p for p in self.bpffs.rglob("*") if p.parent != self.bpffs or not p.name.endswith(".debug")]
        left = [str(p) for p in pins] + [str(p) for p in (self.work / "var-lib").rglob("*")]
        if left:
            raise CheckFailed(f"left behind: {left}\n{log}")
        nft = docker("exec", self.controller, "nft", "list", "tables", check=False).stdout
        if "ambit_default" in nft:
            raise CheckFailed(f"the nftables table is left:\n{nft}")
        docker("stop", "-t", "30", self.controller, timeout=60)
        code = docker("inspect", "-f", "{{.State.ExitCode}}", self.controller).stdout.strip()
        if code != "0":
            raise CheckFailed(f"the controller exited {code} on SIGTERM; log:\n{logs(self.controller)}")
        return "filters, pins, nftables table and state removed; the controller exited 0 on SIGTERM"

    def lab_mesh(self) -> str:
        venv = ROOT / ".venv"
        if not (venv / "pyvenv.cfg").is_file():
            raise CheckFailed(f"no project venv at {venv}: run `make setup`")
        view = self.work / "venv-view"
        (view / "bin").mkdir(parents=True)
        shutil.copy(venv / "pyvenv.cfg", view / "pyvenv.cfg")
        (view / "lib").symlink_to(venv / "lib")
        (view / "bin" / "python").symlink_to((venv / "bin" / "python").resolve())
        # In the netns the lab started it in (found by inode among the named ones), as the image's console script.
        run = view / "bin" / "ambit-image-run"
        priv = " ".join(self.priv)
        run.write_text(
            "#!/bin/sh\nset -e\nprog=$1; shift\nino=$(stat -L -c %i /proc/self/ns/net); ns=\n"
            'for f in /run/netns/*; do [ "$(stat -L -c %i "$f")" = "$ino" ] && ns=$f; done\n'
            '[ -n "$ns" ] || { echo "ambit-image-run: not in a named netns" >&2; exit 1; }\n'
            f'exec docker run --rm -i --name "{self.prefix}-$(basename "$ns")-$prog" --network host {priv} '
            "-v /run/netns:/run/netns:ro -v /run/ambit:/run/ambit -v /sys/fs/bpf:/sys/fs/bpf "
            "-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro "
            f'--entrypoint nsenter {self.image} --net="$ns" -- "$prog" "$@"\n'
        )
        for prog in ("ambit-agent", "ambit-controller"):
            (view / "bin" / prog).write_text(f'#!/bin/sh\nexec "$(dirname "$0")/ambit-image-run" {prog} "$@"\n')
        for path in (view / "bin").iterdir():
            if not path.is_symlink():
                path.chmod(0o755)
        self.lab = f"imgchk-{os.getpid()}"
        ambitctl = [str(view / "bin" / "python"), "-m", "cli.ambitctl", "lab"]
        up = self.host(*ambitctl, "up", "--mesh", "--name", self.lab, timeout=300)
        names = docker("ps", "--filter", f"name={self.prefix}-", "--format", "{{.Names}}").stdout.split()
        wanted = {f"{self.prefix}-{self.lab}-{n}" for n in ("core-ambit-controller", "node-node1-ambit-agent",
                                                             "node-node2-ambit-agent")}  # fmt: skip
        if not wanted <= set(names):
            raise CheckFailed(f"the lab is up but not from the image: containers {names}\n{up}")
        answers = []
        for url, pod in (("http://10.244.2.10:8080/", "server-1"), ("http://10.96.0.10/", "server-")):
            out = self.host(*ambitctl, "exec", "--name", self.lab, "demo/client", "--", "curl", "-sS", "-m", "5", url)
            if f'"pod": "{pod}' not in out:
                raise CheckFailed(f"demo/client -> {url}: {out!r}")
            answers.append(url)
        log = Path(f"/run/ambit/labs/{self.lab}/logs/agent-node2.log").read_text()
        if '"connection complete"' not in log or "spiffe://cluster.local/ns/demo/sa/client" not in log:
            raise CheckFailed(f"node2's agent logged no mTLS connection from demo/client:\n{log[-2000:]}")
        return f"{self.how}; demo/client reached {' and '.join(answers)} through the image's agents"

    def host(self, *argv: str, timeout: float = 60.0) -> str:
        """A host command from the repository root; a failure carries its output."""
        try:
            proc = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise CheckFailed(f"{' '.join(argv)}: no answer in {timeout:.0f}s") from e
        if proc.returncode != 0:
            raise CheckFailed(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def close(self) -> None:
        docker("rm", "-f", self.agent, self.controller, check=False)
        if self.bpffs_mounted:
            subprocess.run(["umount", "-l", str(self.bpffs)], check=False)
        if self.lab:
            view_python = self.work / "venv-view" / "bin" / "python"
            try:
                self.host(str(view_python), "-m", "cli.ambitctl", "lab", "down", "--name", self.lab, timeout=120)
            except CheckFailed as e:
                print(f"lab down: {e}", file=sys.stderr)
        docker("rm", "-f", self.agent, self.controller, check=False)
        leftover = docker("ps", "-aq", "--filter", f"name={self.prefix}-", check=False).stdout.split()
        if leftover:
            docker("rm", "-f", *leftover, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--image", default=os.environ.get("AMBIT_IMAGE", "ambit:dev"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("FAIL image check: needs root (privileged containers, kernel headers)", file=sys.stderr)
        return 1
    if shutil.which("docker") is None:
        print("FAIL image check: no docker CLI on PATH", file=sys.stderr)
        return 1
    try:
        docker("image", "inspect", args.image)
    except CheckFailed as e:  # no daemon, or no such image: an error here, never a skipped check
        print(f"FAIL image check: {e}", file=sys.stderr)
        return 1
    check = ImageCheck(args.image)
    try:
        check.run("entry points", check.entry_points)
        check.run("tools", check.tools)
        check.run("bcc in the venv", check.bcc)
        # Each of these needs the one before: a check that cannot run counts as failed below.
        _ = (
            check.run("controller as the Deployment runs it", check.controller_ready)
            and check.run("agent as the DaemonSet runs it", check.agent_ready)
            and check.run("agent restart adopts capture", check.restart)
            and check.run("agent SIGTERM", check.sigterm)
            and check.run("cleanup as daemonset/cleanup runs it", check.cleanup)
        )
        check.run("lab mesh from the image", check.lab_mesh)
    finally:
        check.close()
    passed = sum(ok for _, ok, _ in check.results)
    failed = len(check.results) - passed
    expected = 9
    if len(check.results) < expected:  # a check that could not run counts as failed, never as skipped
        failed += expected - len(check.results)
    # The closing line in the plain form CI's log reader counts ("word: N passed, N failed").
    print(f"checked image {args.image}")
    print(f"image-check: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
