"""Haraka 3.3 (npm, installed by bench.rig.peer_install) as a relay instance in a temporary
directory, configured by the files in bench/peers/haraka/.

The instance relays for 127.0.0.0/8 into its outbound queue (fsync before the 250) and
delivers each test domain to its sink, named per domain in smtp_forward.ini (its get_mx
hook: no DNS), as the Postfix relay does with transport_maps. It runs in the
foreground (`haraka -c <dir>`, a cluster of one worker per CPU) as the bench's child.

    with HarakaRelay(workdir, routes={"d1.test": "127.0.0.2"}, sink_port=2600) as haraka:
        ... submit to 127.0.0.1:haraka.port ...
        haraka.queue_depth()
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from bench.rig import peer_install
from bench.rig.peer_relay import PeerRelay

CONFIGS = Path(__file__).resolve().parents[1] / "peers" / "haraka"
NOT_CONFIG = {"README.md"}


def forward_sections(routes: Mapping[str, str], sink_port: int) -> str:
    """smtp_forward.ini sections: each test domain's next hop (its sink)."""
    return "".join(f"\n[{domain}]\nhost={address}\nport={sink_port}\n"
                   for domain, address in routes.items())


class HarakaRelay(PeerRelay):
    """A Haraka instance of our own: `start()`, `queue_depth()`, `stop()`."""

    name = "haraka"
    log_name = "haraka.log"
    start_timeout = 60.0  # node loads every plugin and forks its workers

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    def write_config(self, install: peer_install.HarakaInstall) -> None:
        """Haraka's shipped config folder (as `haraka -i` makes it: every file the core
        reads has its defaults there), then ours over it."""
        config = self.root / "config"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(install.package / "config", config, dirs_exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        for source in CONFIGS.iterdir():
            if source.is_file() and source.name not in NOT_CONFIG:
                shutil.copyfile(source, config / source.name)
        shutil.copytree(CONFIGS / "local_plugins", self.root / "plugins", dirs_exist_ok=True)
        smtp = config / "smtp.ini"
        smtp.write_text(smtp.read_text().replace("@LISTEN@", f"{self.host}:{self.port}"))
        with open(config / "smtp_forward.ini", "a") as forward:
            forward.write(forward_sections(self.routes, self.sink_port))

    def start(self) -> HarakaRelay:
        install = peer_install.haraka()
        self.write_config(install)
        node = shutil.which("node") or "node"
        self.launch([node, str(install.entry), "-c", str(self.root)],
                    dict(os.environ, NODE_ENV="production"), cwd=self.root)
        return self

    def queue_depth(self) -> int:
        """Messages in the outbound queue (its files; not the temporary '.' ones, not
        the 'error.' ones set aside)."""
        with contextlib.suppress(OSError):
            return sum(1 for name in os.listdir(self.queue_dir)
                       if not name.startswith((".", "error.")))
        return 0
