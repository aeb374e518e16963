"""ostp_server."""
