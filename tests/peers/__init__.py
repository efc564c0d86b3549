"""Field devices as separate processes, for tests that must kill or freeze a real peer."""
