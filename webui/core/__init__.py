"""Pure-Python core: parameters, prompt syntax, infotext, sampler names, events.
Must not import torch, diffusers, gradio or anything outside the standard library."""
