"""The loss-weighting methods: one scalar loss from the per-task losses, no per-task gradients."""
