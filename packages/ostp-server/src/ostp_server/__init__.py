"""ostp_server: a reference OSTP server (spec §9) on ostp_proto and anyio.

From Python::

    cfg = ServerConfig.model_validate({"listen": "127.0.0.1:0", "access_keys": [key]})
    async with running_server(cfg) as server:
        host, port = server.addresses[0]

or ``server = await tg.start(serve, cfg)`` inside your own task group.
"""

from .cli import generate_key, share_links
from .config import ConfigError, ServerConfig, User, load_config, parse_config_text
from .server import KeyStats, OstpServer, ServerStats, running_server, serve

__all__ = [
    "ConfigError",
    "KeyStats",
    "OstpServer",
    "ServerConfig",
    "ServerStats",
    "User",
    "generate_key",
    "load_config",
    "parse_config_text",
    "running_server",
    "serve",
    "share_links",
]

__version__ = "0.2.0.dev0"
"""The package version (read by the build: `[tool.hatch.version]`)."""
