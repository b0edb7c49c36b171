"""The webui package: a Stable Diffusion web UI with A1111-compatible prompts, infotext and API.
Must not import anything at package import time beyond the standard library (no torch, no gradio)."""

__version__ = "0.1.0"
