"""Model repository: config + ONNX (forward passes) + torch export program (gradients) per model."""
