"""The built-in defenses, installed as ``patchbench.defenses`` and registered by entry point."""
