"""OpenRouter Gateway: a self-hosted, OpenAI-compatible gateway in front of OpenRouter."""

__version__ = "0.1.0"
