"""The project's own backends, registered through the same entry-point group as any plugin."""
