"""**Load model**: model, inputs and loss specs, and checkpoints (read as data, never unpickled)."""
