"""Run a command under the system-call sandbox a systemd unit file asks for, without systemd.

    python tests/service_sandbox.py agent/ftte-agent.service -- python -m ftte_agent.cli ...

Reads the unit's ``SystemCallFilter=`` lines (resolving ``@groups`` with ``systemd-analyze
syscall-filter``), ``SystemCallErrorNumber=``, ``RestrictAddressFamilies=`` and
``MemoryDenyWriteExecute=``, builds the same seccomp filter with libseccomp (through ctypes),
sets no_new_privs (``NoNewPrivileges=yes``) and execs the command. So a test can check that the
agent and the hub still work inside the unit's filter (numpy, the kernels, libsodium,
zeroconf's sockets) on a machine where systemd does not run services, e.g. a CI container.

Mirrors systemd's rules: an allow list, later ``~`` lines removing from it; a denied call
fails with the errno (the process is not killed); sockets of other families fail with
EAFNOSUPPORT; MemoryDenyWriteExecute refuses mmap with PROT_WRITE|PROT_EXEC and any mprotect or
pkey_mprotect adding PROT_EXEC. Exit status 125 when the sandbox cannot be built.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Set, Tuple

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
PROT_WRITE, PROT_EXEC = 0x2, 0x4
FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6,
            "AF_NETLINK": getattr(socket, "AF_NETLINK", 16), "AF_PACKET": getattr(socket, "AF_PACKET", 17)}


class SandboxError(RuntimeError):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def unit_settings(path: str) -> Dict[str, List[str]]:
    """The [Service] assignments of a unit file, in order (key -> list of values)."""
    out: Dict[str, List[str]] = {}
    section = ""
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]" and "=" in line:
                k, v = line.split("=", 1)
                out.setdefault(k.strip(), []).append(v.strip())
    return out


def resolve_groups(names: List[str], cache: Dict[str, Set[str]]) -> Set[str]:
    """Syscall names of a SystemCallFilter= value (``@group`` expanded by systemd-analyze)."""
    found: Set[str] = set()
    for name in names:
        if not name.startswith("@"):
            found.add(name)
            continue
        if name not in cache:
            text = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                                  timeout=60, check=True).stdout
            members = [ln.strip() for ln in text.splitlines()[1:] if ln.strip() and not ln.strip().startswith("#")]
            cache[name] = set()
            cache[name] = resolve_groups(members, cache)
        found |= cache[name]
    return found


def syscall_sets(settings: Dict[str, List[str]]) -> Tuple[Set[str], bool]:
    """(allowed syscall names, whether a filter is set) from the SystemCallFilter= lines."""
    allowed: Optional[Set[str]] = None
    cache: Dict[str, Set[str]] = {}
    for value in settings.get("SystemCallFilter", []):
        deny = value.startswith("~")
        names = value.lstrip("~").split()
        if not names:
            allowed = None
            continue
        group = resolve_groups(names, cache)
        if allowed is None:
            if deny:
                raise SandboxError("a deny-list first SystemCallFilter= is not supported here")
            allowed = set(group)
        elif deny:
            allowed -= group
        else:
            allowed |= group
    return (allowed or set()), allowed is not None


def build_and_load(unit: str) -> None:
    settings = unit_settings(unit)
    allowed, filtered = syscall_sets(settings)
    if not filtered:
        raise SandboxError(f"{unit} sets no SystemCallFilter=")
    lib_name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(lib_name, use_errno=True)
    except OSError as e:
        raise SandboxError(f"libseccomp is not available: {e}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    errname = (settings.get("SystemCallErrorNumber") or ["EPERM"])[-1]
    err = getattr(errno, errname, errno.EPERM)
    deny = 0x00050000 | err                      # SCMP_ACT_ERRNO(err)
    ctx = lib.seccomp_init(deny)
    if not ctx:
        raise SandboxError("seccomp_init failed")

    def nr(name: str) -> int:
        return lib.seccomp_syscall_resolve_name(name.encode())

    def rule(action: int, name: str, *conds: Tuple[int, int, int, int]) -> None:
        n = nr(name)
        if n < 0:
            return  # not a syscall of this architecture
        arr = (_ArgCmp * len(conds))(*[_ArgCmp(*c) for c in conds]) if conds else None
        rc = lib.seccomp_rule_add_array(ctx, action, n, len(conds), arr)
        if rc < 0:
            raise SandboxError(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")

    special = set()
    mdwx = (settings.get("MemoryDenyWriteExecute") or ["no"])[-1] in ("yes", "true", "1", "on")
    families = (settings.get("RestrictAddressFamilies") or [""])[-1].split()
    if mdwx:
        special |= {"mmap", "mmap2", "mprotect", "pkey_mprotect", "shmat"}
        for call in ("mmap", "mmap2"):   # W or X, never both
            if call in allowed:
                rule(SCMP_ACT_ALLOW, call, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0))
                rule(SCMP_ACT_ALLOW, call, (2, SCMP_CMP_MASKED_EQ, PROT_WRITE, 0))
        for call in ("mprotect", "pkey_mprotect"):
            if call in allowed:
                rule(SCMP_ACT_ALLOW, call, (2, SCMP_CMP_MASKED_EQ, PROT_EXEC, 0))
        if "shmat" in allowed:
            rule(SCMP_ACT_ALLOW, "shmat", (2, SCMP_CMP_MASKED_EQ, 0o100000, 0))   # SHM_EXEC
    if families and not families[0].startswith("~"):
        special |= {"socket"}
        for fam in families:
            if fam not in FAMILIES:
                raise SandboxError(f"unknown address family {fam}")
            rule(SCMP_ACT_ALLOW, "socket", (0, SCMP_CMP_EQ, FAMILIES[fam], 0))
        # other families: EAFNOSUPPORT, as systemd does
        for fam, value in FAMILIES.items():
            if fam not in families:
                rule(0x00050000 | errno.EAFNOSUPPORT, "socket", (0, SCMP_CMP_EQ, value, 0))
    for name in sorted(allowed - special):
        rule(SCMP_ACT_ALLOW, name)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError("prctl(PR_SET_NO_NEW_PRIVS) failed")
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise SandboxError(f"seccomp_load failed: {os.strerror(-rc)}")


def main(argv: List[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: service_sandbox.py UNIT -- COMMAND...", file=sys.stderr)
        return 125
    unit, cmd = argv[0], argv[2:]
    if not shutil.which("systemd-analyze"):
        print("service_sandbox: systemd-analyze is not installed", file=sys.stderr)
        return 125
    try:
        build_and_load(unit)
    except (SandboxError, OSError, subprocess.SubprocessError) as e:
        print(f"service_sandbox: {e}", file=sys.stderr)
        return 125
    os.execvp(cmd[0], cmd)
    return 125


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
