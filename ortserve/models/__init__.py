"""Workflows over storage and conversion: pull, create (Modelfile -> manifest), adapters."""
