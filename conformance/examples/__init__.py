"""Example adapters: how an outside backend is wrapped to be tested by the suite."""
