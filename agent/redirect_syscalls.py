"""The few bpf(2) commands the agent needs on pinned objects, issued directly through libc's syscall().

The long-running agent works on maps and the program that the loader child (agent/redirect_loader.py) pinned, so it
never loads libbcc: that library drags in LLVM and clang (~80 MB resident once touched) just to reach thin syscall
wrappers. Errors come back as OSError with the kernel's errno; callers turn them into the capture exceptions.
"""

from __future__ import annotations

import ctypes as ct
import os
import platform

# enum bpf_cmd (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_OBJ_GET_INFO_BY_FD = 15

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351, "armv7l": 386}


class _MapElemAttr(ct.Structure):
    _fields_ = [
        ("map_fd", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("key", ct.c_uint64),
        ("value", ct.c_uint64),  # next_key for BPF_MAP_GET_NEXT_KEY
        ("flags", ct.c_uint64),
    ]


class _MapCreateAttr(ct.Structure):
    _fields_ = [
        ("map_type", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("numa_node", ct.c_uint32),
        ("map_name", ct.c_char * 16),
    ]


class _ObjAttr(ct.Structure):
    _fields_ = [("pathname", ct.c_uint64), ("bpf_fd", ct.c_uint32), ("file_flags", ct.c_uint32)]


class _InfoAttr(ct.Structure):
    _fields_ = [("bpf_fd", ct.c_uint32), ("info_len", ct.c_uint32), ("info", ct.c_uint64)]


_LIBC: ct.CDLL | None = None


def _bpf(cmd: int, attr: ct.Structure) -> int:
    global _LIBC
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(0, f"bpf(2) syscall number unknown for {platform.machine()}")
    if _LIBC is None:
        _LIBC = ct.CDLL(None, use_errno=True)
        _LIBC.syscall.restype = ct.c_long
    ret = int(_LIBC.syscall(ct.c_long(nr), ct.c_long(cmd), ct.byref(attr), ct.c_uint(ct.sizeof(attr))))
    if ret < 0:
        err = ct.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _addr(obj: ct._CData | None) -> int:
    return ct.addressof(obj) if obj is not None else 0


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    """A new map (flags 0, as BCC creates BPF_TABLE_PINNED maps); the fd is the only reference until pinned."""
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_name=name.encode()[:15],
    )
    return _bpf(BPF_MAP_CREATE, attr)


def obj_get(path: str) -> int:
    """A new fd for the map or program pinned at ``path``."""
    name = ct.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ct.addressof(name)))


def obj_pin(fd: int, path: str) -> None:
    name = ct.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ct.addressof(name), bpf_fd=fd))


def obj_info(fd: int, info: ct.Structure) -> None:
    """Fill ``info`` (a prefix of struct bpf_map_info / bpf_prog_info) for ``fd``."""
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=ct.addressof(info)))


def map_lookup(fd: int, key: ct._CData, value: ct._CData) -> None:
    _bpf(BPF_MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))


def map_update(fd: int, key: ct._CData, value: ct._CData, flags: int) -> None:
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags))


def map_delete(fd: int, key: ct._CData) -> None:
    _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key)))


def map_next_key(fd: int, key: ct._CData | None, next_key: ct._CData) -> None:
    """The key after ``key`` (the first key when None); OSError ENOENT at the end."""
    _bpf(BPF_MAP_GET_NEXT_KEY, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(next_key)))
