"""An upstream-behaviour OSTP peer (the Rust implementation's ARQ and server, from the spec)."""
