"""zsadx: train and evaluate CLIP-based zero-shot anomaly detection at cluster scale."""
__version__ = "0.1.0"
