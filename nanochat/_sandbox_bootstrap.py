"""
Child-side bootstrap of the code sandbox; run only by nanochat.sandbox.execute_code as
`python -I -S -B _sandbox_bootstrap.py '<json config>'` (see sandbox.py for the design). Stdlib only.

Process tree when isolation is available (we are root and unshare works):
  supervisor (root, our namespaces)      forwards SIGTERM as SIGKILL to init, reports the code's exit status
    init (PID 1 of new pid/mount/net ns) sets up mounts, limits and uid, reaps everything, exits when the code does;
                                         its exit makes the kernel kill every remaining process of the namespace
      code (uid nobody)                  installs the Python guards and exec()s the program
"""

import builtins
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

libc = ctypes.CDLL(None, use_errno=True)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {target}: {os.strerror(errno)}")


def _traversable(path):
    """Can uid nobody reach `path`? Returns the topmost ancestor it cannot enter, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if not os.stat(prefix).st_mode & 0o001:
            return prefix
    return None


def _expose(path):
    """Make `path` (the Python install) reachable by nobody, e.g. /root/.pyenv/... under a 0700 /root: cover the
    blocking ancestor with an empty 0755 tmpfs and bind `path` back into it. This also hides the rest of /root."""
    blocked = _traversable(path)
    if blocked is None:
        return
    handle = os.open(path, os.O_PATH | os.O_DIRECTORY)
    _mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    os.makedirs(path, exist_ok=True)
    _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
    os.close(handle)


def _read_only_everywhere(except_path):
    """Remount every mount of our (private) mount namespace read-only, keeping nosuid/nodev/noexec/atime flags."""
    failed = []
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        target = fields[4].encode().decode("unicode_escape")  # octal escapes such as \040 for a space
        if target == except_path:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= OPTION_FLAGS.get(opt, 0)
        try:
            _mount(None, target, None, flags)
        except OSError:
            failed.append(target)
    return failed


def _set_limits(cfg):
    mem, cpu = cfg["memory_bytes"], cfg["cpu_seconds"]
    limits = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem), (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
              (resource.RLIMIT_NOFILE, cfg["max_open_files"]), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NPROC, cfg["max_processes"])]
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # soft: SIGXCPU, hard one second later: SIGKILL


def _drop_privileges(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # as root this sets real, effective and saved ids and clears all capabilities


def _install_guards(network_guard):
    """Second layer, from the reference sandbox: stop accidental damage. Not a security boundary."""
    import faulthandler
    import shutil
    import subprocess
    faulthandler.disable()
    builtins.exit, builtins.quit, builtins.help = None, None, None
    for name in ["kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"]:
        setattr(os, name, None)
    shutil.rmtree, shutil.move, shutil.chown = None, None, None
    subprocess.Popen = None
    for name in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
        sys.modules[name] = None
    if network_guard:
        import socket

        def no_network(*args, **kwargs):
            raise OSError("network access is disabled in the sandbox")
        socket.socket = no_network
        socket.create_connection = no_network
        socket.getaddrinfo = no_network


def _run_program(code, info):
    _install_guards(network_guard=info["network"] == "python-guard")
    program_globals = {"__name__": "__main__", "__builtins__": builtins, "__sandbox__": info}
    exec(compile(code, "<sandbox>", "exec"), program_globals)


def _exit_like(status):
    """Leave with the same outcome as a child's wait status (re-raising its signal so our parent sees -N)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # only reached for signals whose default action is to ignore
    os._exit(os.waitstatus_to_exitcode(status))


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        code = f.read()
    workdir = cfg["workdir"]
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | (0 if cfg["allow_network"] else CLONE_NEWNET)
    isolated = os.geteuid() == 0 and libc.unshare(flags) == 0
    info = {"isolated": isolated, "uid": os.geteuid(), "pid_namespace": isolated,
            "network": "allowed" if cfg["allow_network"] else ("namespace" if isolated else "python-guard"),
            "filesystem": "permissions-only"}
    if not isolated:
        # Fallback: limits + guards only (not a security boundary). Drop root if nobody can still import the stdlib.
        _set_limits(cfg)
        if os.geteuid() == 0 and _traversable(sys.base_prefix) is None:
            _drop_privileges(cfg["uid"])
            info["uid"] = cfg["uid"]
        _run_program(code, info)
        return

    status_read, status_write = os.pipe()
    init = os.fork()
    if init:
        # supervisor: root, outside the namespaces, cannot be signalled by the sandboxed uid.
        os.close(status_write)
        signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
        os.waitpid(init, 0)
        reported = os.read(status_read, 64)
        _exit_like(int(reported) if reported else 9)  # no report: init was killed -> like SIGKILL

    # init: PID 1 of the new PID namespace, still root inside our fresh mount namespace.
    os.close(status_read)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # only this namespace's processes
    _expose(sys.base_prefix)
    _mount(workdir, workdir, None, MS_BIND)  # its own mount point, so it stays writable below
    failed = _read_only_everywhere(except_path=workdir)
    info["filesystem"] = "read-only-mounts" if not failed else f"read-only-mounts (failed: {', '.join(failed)})"
    os.chdir(workdir)  # resolve through the writable bind mount
    _set_limits(cfg)
    _drop_privileges(cfg["uid"])
    info["uid"] = cfg["uid"]
    child = os.fork()
    if child == 0:
        os.close(status_write)
        _run_program(code, info)
        return
    while True:  # reap orphans too; stop when the program itself ends
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    os.write(status_write, str(status).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
