"""Export of the backbone and students to ONNX (and TensorRT where present)."""
