"""CPU time of an MTA's whole process tree, by a cgroup v2 of its own.

A walk of /proc from the MTA's root process misses the short-lived children that were
reaped by a process other than the one it reads (Postfix's smtpd and smtp, Exim's
delivery processes, which are re-executed, forked twice, and waited for by their
parents), and a process that daemonizes leaves the walk altogether. A cgroup keeps
every process started from its first member, whatever its parents do, and its
cpu.stat counts the CPU of every member that ever ran in it, the exited ones too.

    cgroup = CpuCgroup.create("postfix")          # None (and `why_not`) if impossible
    subprocess.run([...], preexec_fn=cgroup.join)  # the start process and its tree
    cgroup.usage_seconds()                         # user + system CPU of everything
    cgroup.close()                                 # kill what is left, remove it

The cgroup is made under the bench's own cgroup on the cgroup v2 hierarchy (the
unified one, /sys/fs/cgroup on a pure v2 system, /sys/fs/cgroup/unified on a hybrid).
Without a writable cgroup v2 the targets fall back on bench.procstat's walk and say so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.procstat import ProcessTree, pss

MOUNTS = Path("/proc/self/mounts")
SELF_CGROUP = Path("/proc/self/cgroup")
REMOVE_TIMEOUT = 5.0


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, if it is."""
    with contextlib.suppress(OSError):
        for line in MOUNTS.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def own_cgroup_path() -> str:
    """This process's cgroup on the v2 hierarchy ("0::/path"), "/" if none is listed."""
    with contextlib.suppress(OSError):
        for line in SELF_CGROUP.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    return "/"


def remove_stale(parent: Path) -> None:
    """Remove the empty cgroups of bench processes that are gone (killed before they
    could remove their own): `mta-bench-<pid>-...` with no such pid."""
    with contextlib.suppress(OSError):
        for path in parent.glob("mta-bench-*-*"):
            pid = path.name.split("-")[2]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    path.rmdir()  # refused while a process is still in it


class CgroupUnavailable(Exception):
    """No cgroup v2 this process may create and move processes into."""


class CpuCgroup:
    """A child cgroup holding one MTA and everything it starts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls, label: str) -> CpuCgroup:
        """A new cgroup for `label`; CgroupUnavailable with the reason if it cannot be."""
        root = cgroup2_root()
        if root is None:
            raise CgroupUnavailable("no cgroup v2 hierarchy is mounted")
        parent = root / own_cgroup_path().lstrip("/")
        remove_stale(parent)
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)
        path = parent / f"mta-bench-{os.getpid()}-{safe}-{time.monotonic_ns()}"
        try:
            path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create a cgroup under {parent}: "
                                    f"{exc.strerror}") from None
        cgroup = cls(path)
        if not (path / "cpu.stat").exists():
            cgroup.close()
            raise CgroupUnavailable(f"{path} has no cpu.stat (kernel too old)")
        try:  # moving a process in may be refused even where creating was allowed
            subprocess.run(["true"], preexec_fn=cgroup.join, check=True,  # noqa: PLW1509
                           timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            cgroup.close()
            raise CgroupUnavailable(f"cannot move a process into {path}: {exc}") from None
        return cgroup

    @classmethod
    def create(cls, label: str) -> tuple[CpuCgroup | None, str]:
        """(the cgroup, "") or (None, why not)."""
        try:
            return cls.make(label), ""
        except CgroupUnavailable as exc:
            return None, str(exc)

    def join(self) -> None:
        """Move the calling process into the cgroup: a `preexec_fn` for subprocess, so
        the start process and everything it forks from then on are members."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def usage_seconds(self) -> float:
        """User + system CPU seconds of every process that has run in the cgroup."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        return 0.0

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        return []

    def close(self) -> None:
        """Kill whatever the MTA left running in the cgroup, then remove it."""
        if not self.path.exists():
            return
        if self.pids():
            with contextlib.suppress(OSError):
                (self.path / "cgroup.kill").write_text("1\n")
        deadline = time.monotonic() + REMOVE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # the killed processes are still being reaped


class CgroupTree(ProcessTree):
    """bench.procstat.ProcessTree's interface (CPU seconds, memory) over a cgroup: CPU
    from its cpu.stat, memory the PSS of its current members."""

    def __init__(self, cgroup: CpuCgroup) -> None:
        super().__init__(cgroup.pids)
        self.cgroup = cgroup

    def sample(self) -> tuple[float, int]:
        with_memory = self._samples % self.MEMORY_EVERY == 0
        self._samples += 1
        self.cpu = max(self.cpu, self.cgroup.usage_seconds())
        if with_memory:
            self.memory = sum(pss(pid) for pid in self.cgroup.pids())
            self.peak_memory = max(self.peak_memory, self.memory)
        return self.cpu, self.memory


class CpuMeter:
    """One target's CPU measurement: a cgroup if possible, else the process walk from
    `roots`; `tree` is what the monitor samples, `note` says which it is."""

    def __init__(self, label: str, roots_fallback: ProcessTree) -> None:
        self.cgroup, why_not = CpuCgroup.create(label)
        if self.cgroup is not None:
            self.tree: ProcessTree = CgroupTree(self.cgroup)
            self.note = f"CPU and memory by cgroup v2 {self.cgroup.path} (whole process tree)"
        else:
            self.tree = roots_fallback
            self.note = (f"CPU by a walk of /proc from the root processes, NOT a cgroup "
                         f"({why_not}): short-lived children may be missed")

    def join(self) -> None:
        """preexec_fn for the target's start processes (nothing without a cgroup)."""
        if self.cgroup is not None:
            self.cgroup.join()

    @property
    def preexec(self) -> Callable[[], None] | None:
        return self.join if self.cgroup is not None else None

    def close(self) -> None:
        if self.cgroup is not None:
            self.cgroup.close()
