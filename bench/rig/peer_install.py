"""The peers the bench compares with, fetched on first use into a directory of the bench's
own (no system package changes, except the Exim user the Debian binary needs):

- Exim 4.96: Debian's exim4-daemon-light conflicts with the postfix package, so it is
  not installed: `apt-get download` fetches the .deb (and any library it needs that is
  not installed), `dpkg-deb -x` unpacks it, and the bench runs the binary from there.
- Haraka 3.3: `npm install Haraka@~3.3.0` into a directory of its own.

The directory is $MTA_BENCH_PEERS, or bench/out/peers in the project (ignored by git).
A lock file keeps two runs from installing at once; each install is made in a temporary
directory and renamed into place, so a half-done install is never used. Failures raise
PeerInstallError with what went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EXIM_VERSION = "4.96"
EXIM_PACKAGE = "exim4-daemon-light"
EXIM_USER = "Debian-exim"  # compiled into Debian's binary: it will not start without it
HARAKA_SPEC = "Haraka@~3.3.0"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
HARAKA_VERSION = "3.3."
NODE_MAJOR = 20  # Haraka 3.3's package.json: "engines": {"node": ">=20"}
INSTALL_TIMEOUT = 600.0
LIB_DIR = "usr/lib/x86_64-linux-gnu"


class PeerInstallError(RuntimeError):
    """A peer could not be fetched or does not run; the message says why."""


def peers_dir() -> Path:
    """$MTA_BENCH_PEERS, or bench/out/peers (ignored by git). Not a home directory: the
    Exim user must be able to walk to the binary (Exim re-executes itself as that user)."""
    explicit = os.environ.get("MTA_BENCH_PEERS")
    return Path(explicit) if explicit else PROJECT_ROOT / "bench" / "out" / "peers"


def check_traversable(path: Path) -> None:
    """Every ancestor of `path` must let other users through (o+x)."""
    for folder in [path.resolve(), *path.resolve().parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            raise PeerInstallError(f"{folder} is not searchable by the Exim user: chmod o+x, "
                                   f"or set MTA_BENCH_PEERS to a directory others can reach")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: list[str], cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT, stdin=subprocess.DEVNULL, check=True)
    except FileNotFoundError:
        raise PeerInstallError(f"{cmd[0]} not found") from None
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise PeerInstallError(f"{' '.join(cmd)} failed: {' / '.join(tail)}") from None
    except subprocess.TimeoutExpired:
        raise PeerInstallError(f"{' '.join(cmd)} took over {INSTALL_TIMEOUT:.0f} s") from None


def _install_into(final: Path, fill: Callable[[Path], None]) -> None:
    """Make `final` by filling a temporary sibling and renaming it into place."""
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        fill(work)
        work.chmod(0o755)
        work.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- Exim ------------------------------------------------------------------------------


@dataclass
class EximInstall:
    root: Path  # the unpacked packages (usr/sbin/exim4, usr/lib/...)

    @property
    def binary(self) -> Path:
        return self.root / "usr" / "sbin" / "exim4"

    @property
    def library_path(self) -> str:
        """For LD_LIBRARY_PATH: the libraries unpacked with it (libidn12 on a Debian 12
        with postfix), before the system's."""
        return str(self.root / LIB_DIR)


def _installed(package: str) -> bool:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", package], text=True,
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return done.returncode == 0 and done.stdout.strip().endswith("installed")


def missing_libraries(depends_output: str) -> list[str]:
    """The lib* packages among `apt-cache depends` output's Depends: lines that
    `_installed` says are not installed."""
    names = []
    for line in depends_output.splitlines():
        kind, _, name = line.strip().lstrip("|").partition(":")
        name = name.strip()
        if kind == "Depends" and name.startswith("lib") and not name.startswith("<"):
            names.append(name)
    return [name for name in dict.fromkeys(names) if not _installed(name)]


def _fill_exim(work: Path) -> None:
    debs = work / "debs"
    debs.mkdir()
    try:
        depends = _run(["apt-cache", "depends", EXIM_PACKAGE]).stdout
    except PeerInstallError:  # a fresh machine: no package lists yet
        _run(["apt-get", "update"])
        depends = _run(["apt-cache", "depends", EXIM_PACKAGE]).stdout
    _run(["apt-get", "download", EXIM_PACKAGE, *missing_libraries(depends)], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(work)])
    shutil.rmtree(debs)
    # The package's binary is setuid root. Exim re-executes itself for deliveries,
    # as the Exim user; a setuid exec from that user is a secure exec, for which the
    # loader ignores LD_LIBRARY_PATH (the unpacked libidn12). The daemon runs as
    # root anyway, so the bit buys nothing here.
    binary = EximInstall(work).binary
    if not binary.exists():
        raise PeerInstallError(f"{EXIM_PACKAGE} has no usr/sbin/exim4")
    binary.chmod(0o755)


def ensure_exim_user() -> None:
    """Debian's exim4 resolves its user at start-up; exim4-base's postinst creates it
    (`adduser --system --group Debian-exim`), and so does this, the same way."""
    try:
        pwd.getpwnam(EXIM_USER)
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise PeerInstallError(f"the user {EXIM_USER} does not exist and only root may add "
                               f"it: sudo useradd --system --user-group {EXIM_USER}")
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir",
          "/nonexistent", "--shell", "/usr/sbin/nologin", EXIM_USER])


def exim_ids() -> tuple[int, int]:
    """The Exim user's uid and gid (its spool and log belong to it)."""
    entry = pwd.getpwnam(EXIM_USER)
    return entry.pw_uid, entry.pw_gid


def exim_version(install: EximInstall) -> str:
    env = {"LD_LIBRARY_PATH": install.library_path, "PATH": "/usr/sbin:/usr/bin:/bin"}
    out = _run([str(install.binary), "-C", "/dev/null", "-bV"], env=env).stdout
    line = next((x for x in out.splitlines() if x.startswith("Exim version ")), "")
    return line.split()[2] if line else ""


def exim() -> EximInstall:
    """Exim 4.96 unpacked (fetched on first use), its user there, the version checked."""
    folder = peers_dir()
    final = folder / f"exim-{EXIM_VERSION}"
    with _locked(folder):
        if not EximInstall(final).binary.exists():
            shutil.rmtree(final, ignore_errors=True)
            _install_into(final, _fill_exim)
    install = EximInstall(final)
    check_traversable(install.binary)
    ensure_exim_user()
    version = exim_version(install)
    if version != EXIM_VERSION:
        raise PeerInstallError(f"{install.binary} is Exim {version or '?'}, not {EXIM_VERSION}"
                               f" (the distribution's candidate changed?): remove {final}")
    return install


# --- Haraka ----------------------------------------------------------------------------


@dataclass
class HarakaInstall:
    root: Path  # the npm prefix: node_modules/Haraka is in it

    @property
    def package(self) -> Path:
        return self.root / "node_modules" / "Haraka"

    @property
    def entry(self) -> Path:
        return self.package / "bin" / "haraka"

    def version(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads((self.package / "package.json").read_text())["version"])
        return ""


def node_major() -> int:
    """The major version of `node` on the PATH (0 if there is none)."""
    if shutil.which("node") is None:
        return 0
    version = _run(["node", "--version"]).stdout.strip().lstrip("v")
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _fill_haraka(work: Path) -> None:
    if node_major() < NODE_MAJOR or shutil.which("npm") is None:
        raise PeerInstallError(f"Haraka 3.3 needs Node.js >= {NODE_MAJOR} with npm (found "
                               f"node {node_major() or 'none'}): the nodejs package of "
                               "deb.nodesource.com, or nodejs.org")
    _run(["npm", "install", "--prefix", str(work), "--no-audit", "--no-fund",
          "--omit=dev", "--loglevel=error", HARAKA_SPEC])


def haraka() -> HarakaInstall:
    """Haraka 3.3 installed from npm (on first use)."""
    folder = peers_dir()
    final = folder / "haraka-3.3"
    with _locked(folder):
        if not HarakaInstall(final).entry.exists():
            shutil.rmtree(final, ignore_errors=True)
            _install_into(final, _fill_haraka)
    install = HarakaInstall(final)
    if not install.version().startswith(HARAKA_VERSION):
        raise PeerInstallError(f"{install.package} is Haraka {install.version() or '?'}, not "
                               f"{HARAKA_VERSION}x: remove {final}")
    return install
