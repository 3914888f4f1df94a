"""Adapters that make training frameworks save and load through torchkeep.

Each adapter is a module named for its framework (``torchkeep.integrations.lightning``, …) that
imports the framework, an optional extra whose install command its errors give; importing
``torchkeep`` or this package imports none of them.
"""
