"""Small shared utilities: error families, data root, device helpers, process-group helpers
(:mod:`.comm`)."""
