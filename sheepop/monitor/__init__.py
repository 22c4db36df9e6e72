"""Driver-side monitoring: metrics.jsonl readers, the live view, plots, the report."""
