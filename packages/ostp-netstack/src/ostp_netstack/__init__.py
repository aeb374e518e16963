"""ostp_netstack."""
