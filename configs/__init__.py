"""The shipped configuration files, installed as package data."""
