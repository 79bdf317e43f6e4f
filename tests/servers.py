"""Private database and broker servers for the outage tests: a PostgreSQL cluster and a redis-server of the
test's own, on free ports, that a test may stop and start again. The machine's shared servers are never
touched."""

from __future__ import annotations

import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The newest PostgreSQL's binaries (Debian keeps them under /usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PrivatePostgres:
    """``initdb`` into a fresh folder and ``pg_ctl start`` on a free port of 127.0.0.1 (trust auth, no fsync), or
    on ``host`` inside the network namespace ``link`` (a :class:`LossyLink`), so that a test can cut the network.

    PostgreSQL refuses to run as root: as root every command runs as the ``postgres`` user, in a folder it
    owns (outside pytest's tmp_path, which only root may enter). Raises RuntimeError when it cannot start."""

    def __init__(self, link: LossyLink | None = None) -> None:
        bindir = _postgres_bin()
        if bindir is None:
            raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH")
        self.bin = bindir
        self.host = link.server if link else "127.0.0.1"
        self._netns = link.exec_prefix if link else []
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="remind-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no postgres user to run PostgreSQL as") from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")
        if link is not None:  # initdb trusts only the loopback interface
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {link.client}/32 trust\n")
        self.start()

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([*self._netns, *self._as, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}{log}")
        return done

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@{self.host}:{self.port}/postgres", autocommit=True,
                             connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.admin_url(name)

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses={self.host} -c fsync=off "
                   "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: every session is ended and the server is down when this returns."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """``redis-server --port <free> --save ''`` (nothing persisted, as a restart that loses what was queued);
    ``kill()`` stops it at once (SIGKILL), ``start()`` brings it back on the same port, empty. With ``link``
    (a :class:`LossyLink`) it listens inside that network namespace, at the far end of the link."""

    def __init__(self, workdir: Path, link: LossyLink | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("no redis-server on PATH")
        self.workdir = workdir
        self.host = link.server if link else "127.0.0.1"
        self._netns = link.exec_prefix if link else []
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([*self._netns, "redis-server", "--bind", self.host, "--port", str(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                                      *(["--protected-mode", "no"] if self._netns else [])],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.kill()


class SilentServer:
    """A TCP listener on a free port of 127.0.0.1 that accepts every connection and never sends a byte: a
    database host behind a firewall that drops packets looks the same to a client (it waits for the answer).
    ``accepted`` counts the connections it took; ``close()`` drops them all."""

    def __init__(self) -> None:
        import threading

        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accepting thread sees close() soon
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="silent-server", daemon=True).start()

    @property
    def accepted(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            self._held.append(conn)  # held open, never read from or written to

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for conn in self._held:
            conn.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class LossyLink:
    """A network namespace of its own, reached from this one through a veth pair: a server started inside it
    (``exec_prefix``) listens at ``server``, and ``drop()`` makes the link lose every packet in both directions
    until ``restore()``. That is what a cut link or a failed-over database host looks like to a client: no refusal,
    no reset, its packets simply never arrive, and the kernel retransmits for about 15 minutes.

    The loss is a ``blackhole`` queueing discipline on each end of the pair (it reports every packet sent and
    discards it; ``netem`` is not in every kernel). Needs root and iproute2; raises RuntimeError otherwise.
    ``close()`` removes the pair and the namespace, and is safe to call twice."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a network namespace and a veth pair need root")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise RuntimeError("no ip or tc on PATH (iproute2)")
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"remind-{tag}"
        self.outer, self.inner = f"rmd{tag}o", f"rmd{tag}i"  # interface names stay under 16 characters
        subnet = random.randrange(1, 1 << 14) * 4  # a /30 in 10.200.0.0/16 .. 10.203.255.252
        base = f"10.{200 + subnet // 65536}.{subnet // 256 % 256}"
        self.client, self.server = f"{base}.{subnet % 256 + 1}", f"{base}.{subnet % 256 + 2}"
        self.dropping = False
        try:
            self._ip("netns", "add", self.namespace)
            self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            self._ip("link", "set", self.inner, "netns", self.namespace)
            self._ip("addr", "add", f"{self.client}/30", "dev", self.outer)
            self._ip("link", "set", self.outer, "up")
            self._inside("ip", "addr", "add", f"{self.server}/30", "dev", self.inner)
            self._inside("ip", "link", "set", self.inner, "up")
            self._inside("ip", "link", "set", "lo", "up")
            self.drop()  # fails here, not in the middle of a test, when the kernel lacks the qdisc
            self.restore()
        except BaseException:
            self.close()
            raise

    @property
    def exec_prefix(self) -> list[str]:
        """Prefix a command with this to run it inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    @staticmethod
    def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run("ip", *args, check=check)

    def _inside(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(*self.exec_prefix, *command, check=check)

    def drop(self) -> None:
        """From now on every packet on the link is lost, both ways."""
        self._run("tc", "qdisc", "replace", "dev", self.outer, "root", "blackhole")
        self._inside("tc", "qdisc", "replace", "dev", self.inner, "root", "blackhole")
        self.dropping = True

    def restore(self) -> None:
        """The link carries packets again (the default queueing discipline is back)."""
        self._run("tc", "qdisc", "del", "dev", self.outer, "root", check=False)
        self._inside("tc", "qdisc", "del", "dev", self.inner, "root", check=False)
        self.dropping = False

    def close(self) -> None:
        """Every process left inside is killed, then the pair and the namespace go."""
        pids = self._ip("netns", "pids", self.namespace, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        self._ip("link", "del", self.outer, check=False)  # removes both ends
        self._ip("netns", "del", self.namespace, check=False)

    def __enter__(self) -> LossyLink:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


S = TypeVar("S")


@contextmanager
def running(what: str, start: Callable[[], S]) -> Iterator[S]:
    """A private server from ``start()``, closed at the end; one that cannot start skips the test (fails it under
    CI=true, naming ``what``)."""
    from support import unavailable

    try:
        server = start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        unavailable(what, exc)
    try:
        yield server
    finally:
        server.close()
