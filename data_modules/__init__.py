"""LightningDataModules and readers/writers for the real dataset layouts (DESIGN.md section 2)."""
