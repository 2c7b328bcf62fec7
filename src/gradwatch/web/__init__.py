"""The playground: ``gradwatch serve`` shows a net's per-layer gradients live in the browser."""
