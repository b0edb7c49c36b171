"""The Gradio front end: one module per tab, each translating widgets to and from core types.
Must not import torch or the engine; it talks to webui.app (queue, gallery, settings) and webui.core only."""
