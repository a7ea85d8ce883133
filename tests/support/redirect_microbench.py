"""Per-packet cost of the capture program, measured with BPF_PROG_TEST_RUN (the kernel runs the program on a
synthetic packet many times and reports the mean duration). Unlike iperf on a shared 2-core machine this isolates
the program itself. Run as root: `python -m tests.support.redirect_microbench [--repeat 1000000]`; prints ns per
packet for each path, asserts nothing. Works in a throwaway netns and pin directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import os
import secrets
import socket
import struct
import subprocess

from agent.redirect import RedirectConfig, _compile, _remove_pin_dir
from agent.redirect_maps import IF_POD, ConfigEntry, IfaceEntry, RedirectMaps
from tests.support.redirect_topology import enter

POD, PEER, DST = "10.77.1.10", "10.77.2.10", "10.77.3.10"


class _TestRunOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


def _packet(src: str, dst: str, proto: int, flags: int = 0) -> bytes:
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    if proto == socket.IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 5 << 4, flags, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", 40000, 53, 8, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))  # fmt: skip
    return eth + ip + l4


def _run(lib: ct.CDLL, fd: int, pkt: bytes, repeat: int) -> tuple[int, int]:
    buf = ct.create_string_buffer(pkt, len(pkt))
    out = ct.create_string_buffer(len(pkt) + 256)
    opts = _TestRunOpts(sz=ct.sizeof(_TestRunOpts), data_in=ct.addressof(buf), data_out=ct.addressof(out),
                        data_size_in=len(pkt), data_size_out=len(out), repeat=repeat)  # fmt: skip
    if lib.bpf_prog_test_run_opts(fd, ct.byref(opts)) != 0:
        raise OSError(ct.get_errno(), "bpf_prog_test_run_opts")
    return int(opts.duration), ct.c_int32(opts.retval).value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1_000_000)
    args = ap.parse_args()
    name = "ambit-" + secrets.token_hex(2)
    cfg = RedirectConfig(instance=name + "-bench")
    subprocess.run(["ip", "netns", "add", name], check=True)
    os.makedirs(cfg.pin_dir)
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.c_void_p]
    try:
        with enter(name):
            fd = _compile(cfg)
            maps = RedirectMaps.open(cfg.pin_dir)
            maps.write_config(ConfigEntry(outbound_port=15001, inbound_port=15006, hbone_port=15008, mark=0x200,
                                          mark_mask=0xF00))  # fmt: skip
            syn, ack = 0x02, 0x10
            cases = [
                ("UDP (non-TCP fast path)", _packet(POD, DST, socket.IPPROTO_UDP), None),
                ("TCP, interface without capture", _packet(PEER, DST, socket.IPPROTO_TCP, ack), None),
                ("TCP, pod interface, nobody enrolled", _packet(PEER, DST, socket.IPPROTO_TCP, ack), "iface"),
                ("TCP ACK from enrolled pod, no socket", _packet(POD, DST, socket.IPPROTO_TCP, ack), "enroll"),
                ("TCP SYN from enrolled pod, no listener", _packet(POD, DST, socket.IPPROTO_TCP, syn), "enroll"),
                ("TCP ACK as an enrolled pod living elsewhere", _packet(POD, DST, socket.IPPROTO_TCP, ack), "spoof"),
            ]
            print(f"{'path':42s} {'ns/packet':>9s}  verdict")
            for label, pkt, setup in cases:
                if setup == "iface":  # test runs see ingress_ifindex 0
                    maps.set_iface(0, IfaceEntry(IF_POD, 0))
                if setup == "enroll":
                    maps.set_home(POD, 0)  # the interface the test run stands for
                    maps.add_workload(POD)
                if setup == "spoof":
                    maps.set_home(POD, 1)  # dropped as spoofed
                duration, verdict = _run(lib, fd, pkt, args.repeat)
                print(f"{label:42s} {duration:9d}  {verdict}")
            maps.close()
            os.close(fd)
    finally:
        _remove_pin_dir(cfg.pin_dir)
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    main()
