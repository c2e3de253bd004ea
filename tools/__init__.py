"""Programs that run around the four stages, from the repository root: python -m tools.<name> (bench, tune, plant, widthcheck)."""
