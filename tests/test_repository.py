"""Checks on the repository itself."""

import importlib


def test_every_package_imports() -> None:
    for name in ("ostp_proto", "ostp_netstack", "ostp_client", "ostp_server", "ostp_tui"):
        assert importlib.import_module(name).__name__ == name
