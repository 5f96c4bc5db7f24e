"""Testinfra suites that prove a golden image; shipped so users can run them against any host."""
