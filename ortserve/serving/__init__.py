"""The one serving pipeline every generation endpoint runs: protocol-neutral and typed."""
