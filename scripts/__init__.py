"""Shipped data: files in this folder are installed into images; this marker makes them package data."""
