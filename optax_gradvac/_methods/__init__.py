"""The Gram-based methods: one module each, plugged into the shared pipeline."""
