"""ostp_tui."""

__version__ = "0.2.0.dev0"
"""The package version (read by the build: `[tool.hatch.version]`)."""
