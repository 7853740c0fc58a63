"""Model: the network factory (`networks`), the losses (`losses`) and the model folder that describes
itself (`folder`: `RunConfig` and checkpoints)."""
