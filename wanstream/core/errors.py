class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model."""
