"""fa_triton's test suite (a package, so that its helper modules import one way)."""
