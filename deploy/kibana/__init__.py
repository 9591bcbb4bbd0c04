"""Kibana saved objects (ndjson), installed as package data."""
