"""A local Elasticsearch for development and tests: the integ-test zip from Maven Central.

    python -m newsbeam.pipeline.local_es fetch                  # download (cached) and unpack
    python -m newsbeam.pipeline.local_es start [--dir D] [--port 9200] [--security]
    python -m newsbeam.pipeline.local_es stop  [--dir D]
    python -m newsbeam.pipeline.local_es status [--dir D]

Standard library only: it runs before anything else is installed. The zip is the bare
server (transport + x-pack core/security); it needs Java 21+ (`ES_JAVA_HOME`, or a JDK
found in /usr/lib/jvm) and refuses to run as root, so as root it runs as the system user
`elasticsearch`, created when missing.

The zip is unpacked only once it matches the checksum Maven Central publishes beside it
(.sha512, else .sha1); where that file cannot be fetched, NEWSBEAM_ES_CHECKSUM=sha512:HEX
(or sha1:HEX) names it. With --security the users get a random password, kept in the
instance's instance.json (mode 0600). `stop` signals only the Elasticsearch of that folder.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from newsbeam.pipeline import es_role

VERSION = os.environ.get("NEWSBEAM_ES_VERSION", "9.5.4")
ARTIFACT = f"org.elasticsearch.distribution.integ-test-zip:elasticsearch:{VERSION}:zip"
CENTRAL = "https://repo.maven.apache.org/maven2"
# As root the server runs as another user, who cannot read root's home: use system folders.
_ROOT = os.geteuid() == 0
CACHE = Path(os.environ.get("NEWSBEAM_CACHE", "/var/cache/newsbeam" if _ROOT else Path.home() / ".cache" / "newsbeam"))
DEFAULT_DIR = Path(os.environ.get("NEWSBEAM_ES_DIR", "/var/lib/newsbeam/elasticsearch" if _ROOT
                                  else Path.home() / ".local" / "share" / "newsbeam" / "elasticsearch"))
RUN_AS = "elasticsearch"
WRITER_USER = "newsbeam-writer"


class LocalEsError(RuntimeError):
    pass


def _say(message: str) -> None:
    print(f"[local-es] {message}", file=sys.stderr, flush=True)


def _zip_path() -> Path:
    m2 = Path(os.environ.get("MAVEN_REPO", Path.home() / ".m2" / "repository"))
    return m2 / "org/elasticsearch/distribution/integ-test-zip/elasticsearch" / VERSION / f"elasticsearch-{VERSION}.zip"


# Digests of the distributions newsbeam was tested with, for registries (mirrors, proxies)
# that serve the zip but not its checksum files.
PINNED_SHA512 = {
    "9.5.4": "a75df614854ace52dd0bce977662b3792873ac077ec0af9026cd0b2a0eb119e449910f8eb8ed577d1a83c51c6ee6af71bf5004c3cf5b418c979186de8b5dd9e6",
}


def _published_checksum(url: str) -> tuple[str, str, str]:
    """(algorithm, hex digest, where it came from) for the file at `url`: Maven Central's
    .sha512, else its .sha1, else the digest pinned here for this version, else
    NEWSBEAM_ES_CHECKSUM."""
    for algorithm in ("sha512", "sha1"):
        try:
            with urllib.request.urlopen(f"{url}.{algorithm}", timeout=60) as response:
                published = response.read(4096).decode("ascii", "replace").split()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                continue
            raise LocalEsError(f"cannot fetch the checksum {url}.{algorithm}: HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            raise LocalEsError(f"cannot fetch the checksum {url}.{algorithm}: {err}") from None
        if published:
            return algorithm, published[0].lower(), f"{url}.{algorithm}"
    if VERSION in PINNED_SHA512:
        return "sha512", PINNED_SHA512[VERSION], f"the digest pinned for Elasticsearch {VERSION}"
    algorithm, _, digest = os.environ.get("NEWSBEAM_ES_CHECKSUM", "").partition(":")
    if algorithm in ("sha512", "sha1") and digest:
        return algorithm, digest.strip().lower(), "NEWSBEAM_ES_CHECKSUM"
    raise LocalEsError(f"no checksum published for {url} (.sha512 or .sha1); set NEWSBEAM_ES_CHECKSUM="
                       "sha512:HEX to the digest from a source you trust")


def verify_archive(archive: Path, url: str) -> str:
    """Checks `archive` against the checksum published for `url`; deletes it and raises
    LocalEsError when they differ. Returns which checksum it matched."""
    algorithm, expected, source = _published_checksum(url)
    digest = hashlib.new(algorithm)
    with open(archive, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        archive.unlink()
        raise LocalEsError(f"{archive.name} does not match its published {algorithm} ({digest.hexdigest()} != "
                           f"{expected} from {source}): deleted; run again to download it anew")
    return f"{algorithm} from {source}"


def fetch(cache: Path = CACHE, central: str = CENTRAL, maven: str | None = "mvn") -> Path:
    """Returns the unpacked distribution, downloading it (through Maven when `maven` is on
    the PATH) and checking it against Maven Central's published checksum before unpacking."""
    home = cache / f"elasticsearch-{VERSION}"
    if (home / "bin" / "elasticsearch").exists():
        return home
    archive = _zip_path()
    url = f"{central}/org/elasticsearch/distribution/integ-test-zip/elasticsearch/{VERSION}/{archive.name}"
    if not archive.exists():
        if maven and shutil.which(maven):
            _say(f"downloading {ARTIFACT} with Maven (cached in ~/.m2)")
            subprocess.run([maven, "-q", "-B", "dependency:get", f"-Dartifact={ARTIFACT}", "-Dtransitive=false"],
                           check=True)
        else:
            archive.parent.mkdir(parents=True, exist_ok=True)
            _say(f"downloading {url}")
            urllib.request.urlretrieve(url, archive)
    _say(f"{archive.name} matches its {verify_archive(archive, url)}")
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    partial = cache / f".unpack-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["unzip", "-q", str(archive), "-d", str(partial)], check=True)
    (partial / f"elasticsearch-{VERSION}").rename(home)
    shutil.rmtree(partial, ignore_errors=True)
    for tool in (home / "bin").iterdir():
        tool.chmod(0o755)
    return home


def _java_major(java_home: Path) -> int:
    release = java_home / "release"
    if release.exists():
        found = re.search(r'JAVA_VERSION="(\d+)', release.read_text())
        if found:
            return int(found.group(1))
    return 0


def java_home() -> Path:
    """ES_JAVA_HOME if set, else the newest JDK >= 21 under /usr/lib/jvm or JAVA_HOME."""
    if os.environ.get("ES_JAVA_HOME"):
        return Path(os.environ["ES_JAVA_HOME"])
    candidates = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        candidates += [p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink()]
    usable = sorted((_java_major(p), str(p)) for p in candidates if _java_major(p) >= 21)
    if not usable:
        raise LocalEsError("Elasticsearch 9 needs Java 21 or newer: install a JDK 21+ "
                           "(e.g. Temurin) and set ES_JAVA_HOME to it")
    return Path(usable[-1][1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class Instance:
    directory: Path
    port: int
    security: bool = False
    username: str = ""
    password: str = ""
    ca_certs: str = ""  # set when HTTP is served over TLS

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_certs else 'http'}://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> dict:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        if self.security:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=self.ca_certs) if self.ca_certs else None
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read() or b"{}")

    def save(self) -> None:
        """instance.json, readable by its owner only: it holds the superuser's password."""
        path = self.directory / "instance.json"
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(handle, 0o600)  # a file made before keeps its old mode otherwise
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def load(cls, directory: Path) -> Instance:
        data = json.loads((directory / "instance.json").read_text())
        data["directory"] = Path(data["directory"])
        return cls(**data)


def _run_as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
                       check=True)
    return ["runuser", "-u", RUN_AS, "--"]


def _is_our_elasticsearch(pid: int, directory: Path) -> bool:
    """Whether `pid` is an Elasticsearch server whose config folder is `directory`'s: a stale
    pid file may name any process by now."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    server = any(part.endswith(b"org.elasticsearch.bootstrap.Elasticsearch") for part in command)
    return server and f"ES_PATH_CONF={directory / 'config'}".encode() in environment


def running_pid(directory: Path) -> int | None:
    """The pid of this folder's Elasticsearch, or None (no pid file, or it names another process)."""
    try:
        pid = int((directory / "es.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_our_elasticsearch(pid, directory.resolve()) else None


def _make_certificates(home: Path, config: Path, env: dict[str, str]) -> Path:
    """A CA and a node certificate for 127.0.0.1/localhost, made with the zip's certutil."""
    certs = config / "certs"
    if (certs / "ca" / "ca.crt").exists():
        return certs
    certs.mkdir(parents=True, exist_ok=True)
    certutil = str(home / "bin" / "elasticsearch-certutil")
    subprocess.run([certutil, "ca", "--pem", "--silent", "--out", str(certs / "ca.zip")], env=env, check=True,
                   capture_output=True)
    subprocess.run(["unzip", "-q", "-o", str(certs / "ca.zip"), "-d", str(certs)], check=True)
    subprocess.run([certutil, "cert", "--pem", "--silent", "--ca-cert", str(certs / "ca" / "ca.crt"),
                    "--ca-key", str(certs / "ca" / "ca.key"), "--ip", "127.0.0.1", "--dns", "localhost",
                    "--name", "node", "--out", str(certs / "node.zip")], env=env, check=True, capture_output=True)
    subprocess.run(["unzip", "-q", "-o", str(certs / "node.zip"), "-d", str(certs)], check=True)
    return certs


def start(directory: Path = DEFAULT_DIR, port: int = 9200, security: bool = False, heap: str = "512m",
          username: str = "newsbeam-admin", password: str | None = None, timeout: float = 180.0,
          tls: bool = False, node_settings: dict[str, object] | None = None) -> Instance:
    """Starts a single-node server bound to 127.0.0.1 and waits for yellow/green health.
    `tls` serves HTTPS with a CA made by elasticsearch-certutil (implies `security`); the
    users' password is random unless given. `node_settings` go into elasticsearch.yml last
    (tests start a node that pushes back, e.g. a tiny `indexing_pressure.memory.limit`)."""
    security = security or tls
    password = password or secrets.token_urlsafe(24)
    home = fetch()
    directory = directory.resolve()
    if running_pid(directory):
        instance = Instance.load(directory)
        _say(f"already running at {instance.url} (pid {running_pid(directory)})")
        return instance
    config = directory / "config"
    if not config.exists():
        shutil.copytree(home / "config", config)
    for sub in ("data", "logs"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    settings = {
        "cluster.name": "newsbeam-local", "node.name": "newsbeam-local-1",
        "network.host": "127.0.0.1", "http.port": port, "transport.port": free_port(),
        "discovery.type": "single-node", "path.data": str(directory / "data"),
        "path.logs": str(directory / "logs"),
        "xpack.security.enabled": security, "xpack.security.http.ssl.enabled": False,
        # Local disks are often fuller than a cluster's; do not go read-only for that.
        "cluster.routing.allocation.disk.threshold_enabled": False,
        "action.destructive_requires_name": False,
    }
    env = {**os.environ, "ES_PATH_CONF": str(config), "ES_JAVA_HOME": str(java_home()),
           "ES_JAVA_OPTS": f"-Xms{heap} -Xmx{heap}"}
    env.pop("JAVA_HOME", None)
    ca_certs = ""
    if tls:
        certs = _make_certificates(home, config, {**env, "ES_JAVA_OPTS": ""})
        settings.update({"xpack.security.http.ssl.enabled": True,
                         "xpack.security.http.ssl.key": str(certs / "node" / "node.key"),
                         "xpack.security.http.ssl.certificate": str(certs / "node" / "node.crt"),
                         "xpack.security.http.ssl.certificate_authorities": [str(certs / "ca" / "ca.crt")]})
        ca_certs = str(certs / "ca" / "ca.crt")
    settings.update(node_settings or {})
    (config / "elasticsearch.yml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    prefix = _run_as_user()
    instance = Instance(directory, port, security, username if security else "", password if security else "",
                        ca_certs)
    if security:
        # File-realm users and roles: they need no .security index, which the bare server
        # cannot create (its mappings use analyzers from the absent analysis-common module).
        (config / "roles.yml").write_text(es_role.roles_file())
        users = str(home / "bin" / "elasticsearch-users")
        for name, role in ((username, "superuser"), (WRITER_USER, es_role.ROLE_NAME)):
            # A folder started before has the user with an older password: replace it.
            subprocess.run([users, "userdel", name], env=env, check=False, capture_output=True)
            added = subprocess.run([users, "useradd", name, "-p", password, "-r", role], env=env, check=False,
                                   capture_output=True, text=True)
            if added.returncode:  # not CalledProcessError: its message would show the password
                raise LocalEsError(f"elasticsearch-users useradd {name} failed: {added.stdout[-500:]}")
    if prefix:
        subprocess.run(["chown", "-R", RUN_AS, str(directory)], check=True)
    _say(f"starting Elasticsearch {VERSION} on {instance.url} (data in {directory})")
    log = open(directory / "startup.log", "wb")
    subprocess.run(prefix + [str(home / "bin" / "elasticsearch"), "-d", "-p", str(directory / "es.pid")],
                   env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    instance.save()
    wait(instance, timeout)
    return instance


def wait(instance: Instance, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            health = instance.request("GET", "/_cluster/health?wait_for_status=yellow&timeout=5s")
            if health.get("status") in ("yellow", "green"):
                _say(f"ready: {instance.url} ({health['status']})")
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last = str(err)
        if not running_pid(instance.directory) and time.monotonic() > deadline - timeout + 15:
            break
        time.sleep(1)
    tail = ""
    for name in ("startup.log", "logs/newsbeam-local.log"):
        path = instance.directory / name
        if path.exists():
            tail += path.read_text(errors="replace")[-3000:]
    raise LocalEsError(f"Elasticsearch did not become healthy at {instance.url} ({last}); log tail:\n{tail}")


def stop(directory: Path = DEFAULT_DIR, timeout: float = 60.0) -> None:
    pid = running_pid(directory.resolve())
    if not pid:
        stale = (directory / "es.pid").exists()
        _say("not running" + (" (the pid file names no Elasticsearch of this folder: left alone)" if stale else ""))
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(directory.resolve()):
        time.sleep(0.5)
    if running_pid(directory.resolve()):
        os.kill(pid, signal.SIGKILL)
    _say(f"stopped (pid {pid})")


def role_shape(role: dict) -> dict:
    """A role's cluster and index privileges, in an order that does not matter."""
    return {"cluster": sorted(role.get("cluster", [])),
            "indices": sorted((sorted(entry["names"]), sorted(entry["privileges"])) for entry in role.get("indices", []))}


def held_role(instance: Instance) -> dict:
    """The privileges Elasticsearch grants the writer user now (GET _security/user/_privileges,
    which reads file-realm roles too), as `role_shape` puts them."""
    writer = dataclasses.replace(instance, username=WRITER_USER)
    return role_shape(writer.request("GET", "/_security/user/_privileges"))


def install_role(instance: Instance, role: dict, timeout: float = 60.0) -> dict:
    """Makes `role` the writer user's role: rewrites roles.yml, which Elasticsearch reloads
    within seconds (the bare server has no role API: that needs the .security index), and
    waits until the node grants exactly that. Returns what the node grants."""
    (instance.directory / "config" / "roles.yml").write_text(es_role.roles_file(role))
    wanted = role_shape(role)
    deadline = time.monotonic() + timeout
    while (held := held_role(instance)) != wanted:
        if time.monotonic() > deadline:
            raise LocalEsError(f"Elasticsearch did not load the role from roles.yml within {timeout:g}s: "
                               f"it grants {held}")
        time.sleep(0.5)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m newsbeam.pipeline.local_es", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["fetch", "start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"instance folder (default {DEFAULT_DIR})")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--heap", default="512m")
    parser.add_argument("--security", action="store_true", help="enable x-pack security (basic auth user)")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a generated CA (implies --security)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch())
        elif args.command == "start":
            instance = start(args.dir, args.port, args.security, args.heap, tls=args.tls)
            print(instance.url)
            if instance.ca_certs:
                _say(f"CA certificate: {instance.ca_certs} (ELASTICSEARCH_CA_CERTS)")
            if instance.security:
                _say(f"users {instance.username} (superuser) and {WRITER_USER} (the pipeline's role), password in "
                     f"{instance.directory / 'instance.json'}: run `newsbeam es setup` as {instance.username} once, "
                     f"then `newsbeam run` as {WRITER_USER}")
        elif args.command == "stop":
            stop(args.dir)
        else:
            pid = running_pid(args.dir.resolve())
            print(f"running (pid {pid}) at {Instance.load(args.dir.resolve()).url}" if pid else "not running")
            return 0 if pid else 1
    except (LocalEsError, subprocess.CalledProcessError, OSError) as err:
        _say(f"error: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
