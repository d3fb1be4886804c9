"""Backbone registry and classifier head."""
