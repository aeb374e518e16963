"""ostp_proto."""
