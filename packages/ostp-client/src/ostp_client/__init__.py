"""ostp_client."""
