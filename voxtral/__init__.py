"""Voxtral: turn a pretrained Mistral-style text LLM into a speech LM, on Ray."""
