"""Inference: the only code that imports onnxruntime_genai and onnxruntime."""
