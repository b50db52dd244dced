"""Local DICOM peers on loopback: a real Orthanc and a DCMTK ``storescp``.

Used by ``ct-ai-node demo`` (a stand-in PACS), by the integration tests and by
the benchmarks. Each peer runs as a child process on free loopback ports with
``TCP_NODELAY=1`` (without it DCMTK and Orthanc stall on delayed ACKs) and is
stopped by ``close()`` or the context manager.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ORTHANC_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"peer exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def nodelay_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def dcmtk_tool(name: str) -> str | None:
    """The DCMTK program ``name`` on PATH, or None. pynetdicom installs Python apps under
    the same names (``storescp``, ``storescu``, ``echoscu``...) into the virtual
    environment's ``bin``, which comes first on PATH once it is activated; those are
    scripts, DCMTK's are executables, so scripts are passed over."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which(name, path=folder or ".")
        if path is None:
            continue
        try:
            with open(path, "rb") as fh:
                if fh.read(2) == b"#!":
                    continue
        except OSError:
            continue
        return path
    return None


def tool_available(name: str) -> bool:
    return dcmtk_tool(name) is not None


class _Peer:
    proc: subprocess.Popen | None = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class StoreSCP(_Peer):
    """DCMTK ``storescp`` writing every received instance into ``folder``."""

    folder: Path
    ae_title: str = "STORESCP"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "StoreSCP":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # -uf: files named by SOP class + instance UID; +B: write straight to disk (faster)
        cmd = [dcmtk_tool("storescp") or "storescp", "--aetitle", self.ae_title, "-uf", "+B",
               "--output-directory", str(self.folder), str(self.port)]
        self.proc = subprocess.Popen(cmd, env=nodelay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_port(self.port, proc=self.proc)
        return self

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


@dataclass
class Orthanc(_Peer):
    """A real Orthanc (Debian package) with DICOMweb, on free loopback ports."""

    folder: Path
    ae_title: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    #: AE titles Orthanc may C-STORE to (name -> (aet, host, port))
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    #: a Python plugin script (needs the Debian package orthanc-python)
    python_script: Path | None = None
    #: more configuration keys (merged last)
    extra_config: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _plugins(self) -> list[str]:
        found = []
        names = ["libOrthancDicomWeb.so"] + (["libOrthancPython.so"] if self.python_script else [])
        for name in names:
            for folder in ORTHANC_PLUGIN_DIRS:
                if (Path(folder) / name).exists():
                    found.append(str(Path(folder) / name))
                    break
        return found

    def start(self, timeout_s: float = 60.0) -> "Orthanc":
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise FileNotFoundError("Orthanc is not installed (Debian package 'orthanc')")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "ct-ai-node test PACS",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": self._plugins(),
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "HttpTimeout": 60,
        }
        if self.python_script:
            config["PythonScript"] = str(self.python_script)
        config.update(self.extra_config)
        cfg_path = self.folder / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(cfg_path)], env=nodelay_env(), stdout=log, stderr=log)
        log.close()
        wait_for_port(self.http_port, timeout_s, self.proc)
        wait_for_port(self.dicom_port, timeout_s, self.proc)
        return self

    def api(self):
        from orthanc_api_client import OrthancApiClient

        return OrthancApiClient(self.url)


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, or where Debian's
    ``postgresql`` package puts it (``/usr/lib/postgresql/<version>/bin``), newest first."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in versions:
        if (folder / name).is_file():
            return str(folder / name)
    return None


@dataclass
class Postgres:
    """A throw-away PostgreSQL server in ``folder`` on a free loopback port (trust
    authentication, loopback only): the suite's and the benchmarks' own shared database.
    ``initdb`` refuses to run as root; as root the server runs as the ``postgres`` user
    that Debian's package creates, so ``folder`` must lie where that user can enter."""

    folder: Path
    port: int = 0
    user: str = "ctai"

    def _cmd(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(postgres_bin("pg_ctl") or "pg_ctl", "-D", str(self.folder / "data"), *args),
                              check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)

    def start(self) -> "Postgres":
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        if not (self.folder / "data").is_dir():
            subprocess.run(self._cmd(postgres_bin("initdb") or "initdb", "-D", str(self.folder / "data"), "-A", "trust",
                                     "-U", self.user, "-E", "UTF8", "--no-sync"),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        self.port = self.port or free_port()
        return self.resume()

    def resume(self) -> "Postgres":
        """Start the server (again, on the same port and data)."""
        # fsync off: a test database need not survive a power cut, and it is much faster
        options = f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off -c max_connections=200"
        started = self._pg_ctl("-o", options, "-l", str(self.folder / "server.log"), "-w", "start", check=False)
        if started.returncode != 0:
            log = self.folder / "server.log"
            tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
            raise RuntimeError(f"PostgreSQL did not start (pg_ctl {started.returncode}): "
                               f"{started.stdout.decode(errors='replace')[-500:]} {tail}")
        wait_for_port(self.port)
        return self

    def pause(self) -> None:
        """Stop the server (fast shutdown: connections are cut, as in a crash or fail-over)."""
        self._pg_ctl("-m", "fast", "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        if (self.folder / "data" / "postmaster.pid").exists():
            self.pause()

    def __enter__(self) -> "Postgres":
        # `with Postgres(folder).start() as pg` and `with Postgres(folder) as pg` alike
        return self if (self.folder / "data" / "postmaster.pid").exists() else self.start()

    def __exit__(self, *exc) -> None:
        self.close()
