"""The torch side: devices, model families and loading, conditioning, sampling, VAE, generation.
Must not import gradio, fastapi or webui.app."""
