"""The REST front end: A1111's /sdapi/v1 facade and the native /api/v1 job API, over the shared queue.
Must not import torch, the engine or gradio; it translates JSON ⇄ core types and talks to webui.app."""
