"""The bottom layer: errors, registries, the typed config, atomic file I/O, the run folder,
process-group helpers and metric sums. It imports nothing else from longtail."""
