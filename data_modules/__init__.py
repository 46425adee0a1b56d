"""LightningDataModules and readers/writers for the real dataset layouts (see each module's docstring)."""
