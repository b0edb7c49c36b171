"""Orchestration: queue, outputs, gallery, extensions, settings store.
Must not import gradio or fastapi."""
