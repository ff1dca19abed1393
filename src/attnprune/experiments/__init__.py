"""Experiments: recipes that use the library (recovery, the eval sweep, translation). The library
never imports them; their reusable parts live in the library (evaluate, report, train, ...)."""
