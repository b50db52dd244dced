"""The web app served by uvicorn on a thread of the node's process."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from ct_ai_node.config import NodeConfig

logger = logging.getLogger(__name__)

#: how long a request waits for a PostgreSQL queue that went away before it fails
WEB_RECONNECT_S = 5.0


class WebServer:
    """Binds ``config.web.host:port`` at construction (a port in use is an error now, not a
    log line later), serves on ``start()``, stops within seconds on ``stop()``.
    ``config_source``: the configuration in force (default: ``config``, fixed); ``store``:
    a :class:`~ct_ai_node.node.config_store.ConfigStore` to edit it (None: read-only)."""

    def __init__(self, config: NodeConfig, services: Callable[[], dict],
                 config_source: Callable[[], NodeConfig] | None = None, store=None, make_room=None):
        import uvicorn

        from ct_ai_node.jobqueue.factory import open_queue, shared_target
        from ct_ai_node.node.audit import AuditLog
        from ct_ai_node.node.job_log import JobLog
        from ct_ai_node.spool import Spool
        from ct_ai_node.web.app import create_app
        from ct_ai_node.web.auth import session_secret

        web, st = config.web, config.storage
        # the app's own connections: requests never wait on the dispatcher's or the SCP's; a
        # page waits seconds, not minutes, for a shared database that went away
        self.queue = open_queue(config, reconnect_s=WEB_RECONNECT_S)
        self.spool = Spool(st.spool_dir, st.db_path, fsync=st.fsync)
        self.audit = AuditLog(st.db_path)
        self.job_log = JobLog(shared_target(config))
        app = create_app(config_source or (lambda: config), self.queue, self.spool, self.audit, services,
                         session_secret(web, st.root), store, make_room, self.job_log)
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((web.host, web.port))
        self.port = self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=3))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="web", daemon=True)

    def start(self) -> "WebServer":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        for part in (self.queue, self.spool, self.audit, self.job_log):
            part.close()
