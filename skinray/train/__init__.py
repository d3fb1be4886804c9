"""Distributed fine-tuning on Ray Train."""
