"""
Sandbox for running generated code (HumanEval-style evaluation, tool use): `execute_code(code)` runs the code in a
fresh interpreter and returns an `ExecutionResult`; `check_program(...)` runs one HumanEval problem's tests.

    from nanochat.sandbox import execute_code, sandbox_capabilities
    r = execute_code("print(1 + 1)")   # r.success, r.stdout == "2\\n", r.error, r.timeout, r.memory_exceeded
    sandbox_capabilities()             # which isolation mechanisms are actually active on this machine

Layers, strongest first. When we are root (the normal case in our containers) the child:
  1. unshares new mount, PID, IPC and (unless allow_network) network namespaces: the network namespace has no
     interfaces at all (even 127.0.0.1 is unreachable); in the mount namespace every mount is remounted read-only
     except a private temporary working directory, and /proc is remounted so only the sandbox's processes exist;
     when the sandbox's init (PID 1 of its namespace) exits or is killed, the kernel kills every process in it, so
     nothing is left behind even if the code forked or called setsid();
  2. runs the code as the unprivileged uid/gid 65534 (nobody) with no supplementary groups: it cannot signal our
     processes, read root-only files, or regain privileges, and RLIMIT_NPROC (per-uid) becomes effective;
  3. has resource limits set before the code runs: RLIMIT_AS/DATA (memory), RLIMIT_CPU, RLIMIT_NPROC (fork bombs),
     RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0; the parent enforces the wall-clock timeout and caps captured output.
  4. in-process Python guards (os.kill/system/fork..., shutil.rmtree, subprocess.Popen set to None, some modules
     blocked), as in the reference implementation. These are NOT a security boundary (ctypes or a re-import gets
     around them); they only stop well-meaning code from doing damage by accident.
When unshare/setuid are not permitted (not root), only layers 3 and 4 apply, plus a Python-level socket guard for
the network: good enough against buggy code, not against hostile code. There is no seccomp filter in any mode.
"""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

SANDBOX_UID = 65534  # nobody / nogroup
_BOOTSTRAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_bootstrap.py")


@dataclasses.dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None        # last traceback line (or a short reason) when not successful
    timeout: bool = False
    memory_exceeded: bool = False
    returncode: int | None = None   # negative: killed by that signal, as in subprocess


def _drain(stream, chunks, limit):
    """Read a pipe to EOF, keeping at most `limit` bytes (the rest is read and dropped so the child never blocks)."""
    kept = 0
    while True:
        data = stream.read1(65536)
        if not data:
            break
        if kept < limit:
            chunks.append(data[:limit - kept])
            kept += len(chunks[-1])
    stream.close()


def execute_code(code, timeout=5.0, memory_bytes=256 * 2**20, cpu_seconds=None, allow_network=False,
                 max_processes=16, file_bytes=16 * 2**20, max_open_files=64, max_output_bytes=2**20):
    """Run `code` (Python source) in the sandbox described in the module docstring.

    timeout: wall-clock seconds; the whole sandbox is killed when it is exceeded.
    memory_bytes: address-space limit per process. cpu_seconds: CPU-time limit per process (None: timeout + 1).
    max_processes: processes/threads the sandbox uid may have. file_bytes: largest file it may write.
    """
    if not isinstance(code, str):
        raise ValueError(f"execute_code: code must be a str, got {type(code).__name__}")
    cpu = int(cpu_seconds) if cpu_seconds is not None else int(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="nanorun-exec-") as private, \
            tempfile.TemporaryDirectory(prefix="nanorun-sandbox-") as workdir:
        # `private` (0700, ours) holds the program; only the bootstrap reads it, before dropping privileges.
        program = os.path.join(private, "program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        if os.geteuid() == 0:
            os.chown(workdir, SANDBOX_UID, SANDBOX_UID)
        config = {"program": program, "workdir": workdir, "memory_bytes": int(memory_bytes), "cpu_seconds": max(1, cpu),
                  "max_processes": int(max_processes), "file_bytes": int(file_bytes),
                  "max_open_files": int(max_open_files), "allow_network": bool(allow_network), "uid": SANDBOX_UID}
        env = {"PATH": "/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": workdir,
               "OMP_NUM_THREADS": "1"}
        # -I: ignore PYTHON* env vars and the user site, no cwd on sys.path; -S: no site-packages (the stdlib stays
        # importable, third-party packages do not); -B: no .pyc writes.
        argv = [sys.executable, "-I", "-S", "-B", _BOOTSTRAP, json.dumps(config)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True, close_fds=True)
        out, err = [], []
        readers = [threading.Thread(target=_drain, args=(proc.stdout, out, max_output_bytes), daemon=True),
                   threading.Thread(target=_drain, args=(proc.stderr, err, max_output_bytes), daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
        for t in readers:
            t.join(timeout=2.0)  # an escaped grandchild (non-isolated mode only) may hold the pipes open
    stdout = b"".join(out).decode("utf-8", errors="replace")
    stderr = b"".join(err).decode("utf-8", errors="replace")
    returncode = proc.returncode
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    success = returncode == 0 and not timed_out
    error = None
    if timed_out:
        error = f"timed out after {timeout:g}s"
    elif not success:
        lines = [line for line in stderr.splitlines() if line.strip()]
        error = lines[-1] if lines else f"exited with code {returncode}"
    return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error, timeout=timed_out,
                           memory_exceeded=memory_exceeded, returncode=returncode)


def _kill(proc):
    """SIGTERM to the root-owned supervisor makes it SIGKILL the sandbox's PID-namespace init (which takes every
    sandbox process with it); SIGKILL to the whole process group is the backstop (and the only tool when isolation
    is unavailable)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@functools.lru_cache(maxsize=1)
def sandbox_capabilities():
    """What the sandbox actually does on this machine, probed by running it once. Keys: uid (int the code runs as),
    network ("namespace", "python-guard" or "allowed"), filesystem ("read-only-mounts" or "permissions-only"),
    pid_namespace (bool), isolated (bool: namespaces + unprivileged uid in effect)."""
    r = execute_code("import json\nprint(json.dumps(__sandbox__))", timeout=10.0)
    if not r.success:
        raise RuntimeError(f"sandbox probe failed: {r.error}")
    return json.loads(r.stdout)


# -----------------------------------------------------------------------------
# HumanEval-style checking


def check_program(prompt, completion, test, entry_point, timeout=5.0, **limits):
    """True when the completion passes `test` (which defines check(candidate)) in the sandbox.
    A completion that defines `entry_point` itself (a chat model answering with the whole function) replaces the
    prompt; otherwise it continues the prompt, as in the original HumanEval harness. The prompt's import lines go
    at the very top either way, so the whole-function form still sees them."""
    imports = [line for line in prompt.splitlines() if line.startswith(("import ", "from "))]
    body = completion if f"def {entry_point}(" in completion else prompt + completion
    program = "\n".join(imports + ["", body, "", test, "", f"check({entry_point})", ""])
    return execute_code(program, timeout=timeout, **limits).success
