"""moekit's test suite, a package: shared helpers are imported relative to it (`from .run_helpers import`)."""
