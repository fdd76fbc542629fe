"""ortserve: a local LLM server on ONNX Runtime GenAI."""

__version__ = "0.1.0"
