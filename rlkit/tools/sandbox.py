"""A sandboxed Python executor for the ``python`` tool.

Every call runs ``python -I -B`` in a fresh subprocess (its own session, so the whole process group
is killed on a timeout) with:

* CPU time: ``RLIMIT_CPU`` (the kernel sends SIGXCPU, then SIGKILL);
* memory: ``RLIMIT_AS`` (an allocation beyond it raises ``MemoryError`` in the child);
* wall clock: ``timeout_s``, then ``killpg(SIGKILL)`` (catches ``time.sleep`` loops that use no CPU);
* files: the working directory is a fresh temporary directory (deleted afterwards), ``HOME`` and
  ``TMPDIR`` point there, ``RLIMIT_FSIZE`` caps file size, and an audit hook (PEP 578) in the child
  refuses to open a file for writing, remove, rename or create anything outside it;
* network: when ``unshare -n`` works (root or user namespaces allowed) the child runs in an empty network
  namespace (no interface but a down loopback).  Independently, the audit hook refuses every
  ``socket.*`` event (creating a socket, connect, getaddrinfo) and starting subprocesses (``os.system``,
  ``subprocess``, ``os.exec*``, ``os.fork``), so without ``unshare`` a program cannot reach the network
  through Python either.

What this is not: a security boundary against hostile code.  Audit hooks can be bypassed by code that
uses ``ctypes`` to call libc directly (the network namespace, when available, still holds then; the
file rule does not).  Run untrusted policies in a container as well.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


class ToolError(RuntimeError):
    """A tool failed; its message becomes the (error) observation."""


_CHILD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_DENY = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "pty.spawn", "os.kill", "os.killpg")
def _inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep) or p == "/dev/null"
def _hook(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in this sandbox")
    if event in _DENY:
        raise PermissionError(f"{event} is disabled in this sandbox")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if isinstance(path, int):
            return
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE)
        if writes and not _inside(path):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
    elif event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                   "os.chmod", "os.chown", "shutil.rmtree", "shutil.move", "shutil.copyfile"):
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                raise PermissionError(f"{event} outside the sandbox directory is disabled: {p}")
if os.environ.pop("RLKIT_SANDBOX_AUDIT", "1") == "1":
    sys.addaudithook(_hook)
del _hook
_src = open("main.py").read()
exec(compile(_src, "main.py", "exec"), {"__name__": "__main__"})
'''


@dataclass
class SandboxResult:
    output: str
    returncode: int
    timed_out: bool = False
    cpu_limited: bool = False
    memory_error: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def observation(self) -> str:
        """The printed output; a failed run raises :class:`ToolError` with the reason and the output's tail."""
        if self.ok:
            return self.output
        if self.timed_out:
            why = "wall-clock time limit exceeded"
        elif self.cpu_limited:
            why = "CPU time limit exceeded"
        elif self.memory_error:
            why = "memory limit exceeded"
        else:
            why = f"exit status {self.returncode}"
        raise ToolError(f"{why}\n{self.output[-1000:]}".rstrip())


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether ``unshare -n`` works here (root, or unprivileged user namespaces enabled)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    for cmd in ([exe, "-n", "true"], [exe, "-r", "-n", "true"]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                _UNSHARE[:] = cmd[:-1]
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    return False


_UNSHARE: list = []


def _limits(cpu_s: float, memory_mb: int, file_mb: int):
    def apply():
        cpu = max(1, int(cpu_s + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        mem = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        f = int(file_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (f, f))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(code: str, timeout_s: float = 10.0, cpu_s: float = 5.0, memory_mb: int = 512, file_mb: int = 16,
               max_output_chars: int = 4000, network_namespace: bool = True, audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` under the limits above; returns its combined stdout/stderr (truncated) and status.
    ``network_namespace`` / ``audit_hook`` switch those layers (tests check each one alone)."""
    work = tempfile.mkdtemp(prefix="rlkit_sandbox_")
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        cmd = [sys.executable, "-I", "-B", "-c", _CHILD]
        if network_namespace and network_namespace_available():
            cmd = _UNSHARE + cmd
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8",
               "RLKIT_SANDBOX_AUDIT": "1" if audit_hook else "0"}
        p = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=_limits(cpu_s, memory_mb, file_mb))
        timed_out = False
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = p.communicate()
        text = out.decode("utf-8", "replace")
        if len(text) > max_output_chars:
            text = text[:max_output_chars] + f"\n... ({len(text) - max_output_chars} more characters)"
        rc = p.returncode
        return SandboxResult(output=text, returncode=rc, timed_out=timed_out,
                             cpu_limited=rc in (-signal.SIGXCPU, -signal.SIGKILL) and not timed_out,
                             memory_error="MemoryError" in text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
