"""Studies: one YAML file runs the whole methodology; a search finds the best trade-off."""
