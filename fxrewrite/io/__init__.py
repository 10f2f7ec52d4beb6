"""Saving and replaying: artifacts (.pt2 / .onnx / .safetensors, written atomically) and replayable plans."""
