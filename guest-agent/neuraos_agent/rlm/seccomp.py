"""A syscall filter for the REPL process, through libseccomp (Debian's libseccomp2) and ctypes.

Default allow with a deny list: the REPL needs an ordinary CPython, so the list names what an
escape needs instead — sockets, new processes and programs, mounts and namespaces, tracing,
kernel modules, io_uring (which would bypass the filter). Denied calls fail with EPERM so the
REPL can report them; `clone3` fails with ENOSYS so glibc falls back to `clone`, where thread
creation (CLONE_THREAD) stays allowed and process creation does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
CLONE_THREAD = 0x00010000

DENIED = (
    # network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "sendmsg", "sendmmsg",
    # new processes and programs (fork bombs); clone is handled by argument below
    "fork", "vfork", "execve", "execveat",
    # escaping the view or the namespaces
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_by_handle_at", "name_to_handle_at",
    "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    # other processes, the kernel
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "bpf", "perf_event_open", "userfaultfd",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "acct", "keyctl", "add_key", "request_key", "sethostname", "setdomainname", "personality",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    try:
        _lib()
        return True
    except OSError:
        return False


def install_filter(extra_denied: tuple[str, ...] = ()) -> list[str]:
    """Load the filter into this process (irreversible; inherited by threads). Returns the names denied."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    denied: list[str] = []
    try:
        def rule(action: int, name: str, args: list[_ArgCmp] | None = None) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not on this architecture
            arr = (_ArgCmp * len(args))(*args) if args else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(args or []), arr)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {name}: {errno.errorcode.get(-rc, rc)}")
            denied.append(name)

        for name in DENIED + extra_denied:
            rule(_errno_action(errno.EPERM), name)
        rule(_errno_action(errno.ENOSYS), "clone3")
        # clone without CLONE_THREAD is a new process: deny it, keep threads
        rule(_errno_action(errno.EPERM), "clone", [_ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0)])
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, "seccomp_load failed")
    finally:
        lib.seccomp_release(ctx)
    return denied
