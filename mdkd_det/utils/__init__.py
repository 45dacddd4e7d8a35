"""Small shared utilities: error families, data root, device helpers."""
