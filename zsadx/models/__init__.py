"""Backbone, shared method pieces (prompts, scoring, losses, adapters) and the methods."""
