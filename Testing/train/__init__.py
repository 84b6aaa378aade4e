"""Training tests (a package, so its conftest does not shadow the other folders' ``conftest`` modules)."""
