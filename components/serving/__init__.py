"""HTTP inference server over a verified model bundle (onnxruntime inside)."""
