"""What several test modules share: fakes, HTTP and waiting helpers, tools, LoRA helpers.

A helper that two test modules need lives here (or in a conftest.py fixture), never in a
test module that others import; docs/development.md says which module holds what.
"""
