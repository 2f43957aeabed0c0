"""FX passes of the pagedllm compile backend, one pass a file."""
