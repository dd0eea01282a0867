"""Developer scripts: the manifest builder and the demo."""
