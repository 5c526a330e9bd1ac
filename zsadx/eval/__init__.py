"""Metrics, the evaluator, tables and visualisation."""
