"""Black-box conformance suite for Hibernatable WebSocket runtimes (see README.md here)."""
