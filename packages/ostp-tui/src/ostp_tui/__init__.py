"""ostp_tui."""
