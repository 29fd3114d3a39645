"""Geodata: reading rasters as the model sees them, units and coordinate frames."""
