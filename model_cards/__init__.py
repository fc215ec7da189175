"""Jinja model-card templates, rendered by hf_capgap.hub through huggingface_hub.ModelCard."""
