"""A private Mosquitto broker for the MQTT baseline: own port, persistence off, pinned like the edge."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from clients.mesh import free_port

# Broker defaults except: loopback listener on a free port, no persistence (nothing is written
# to disk), $SYS every second so the drop counter can be read at the end of a run.
CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence false
sys_interval 1
log_dest file {log}
log_type error
log_type warning
"""


@dataclass
class Broker:
    """A mosquitto process we own, or an existing broker we only connect to."""

    host: str
    port: int
    config: str
    popen: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_broker(work_dir: Path, timeout_s: float = 10.0) -> Broker:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise FileNotFoundError("mosquitto is not installed; pass --mqtt HOST:PORT of a broker")
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = CONFIG.format(port=port, log=work_dir / "mosquitto.log")
    conf = work_dir / "mosquitto.conf"
    conf.write_text(config)
    popen = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    broker = Broker("127.0.0.1", port, config, popen)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return broker
        if popen.poll() is not None or time.monotonic() > deadline:
            broker.stop()
            raise RuntimeError(f"mosquitto did not start on port {port}; see {work_dir}")
        time.sleep(0.05)


def external_broker(address: str) -> Broker:
    host, _, port = address.rpartition(":")
    return Broker(host or "127.0.0.1", int(port), "external broker: configuration not known")
