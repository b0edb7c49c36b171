"""Extra networks: LoRA/LyCORIS files → weight patches, textual-inversion embeddings, and their files on disk.
Must not import gradio, fastapi or webui.app."""
