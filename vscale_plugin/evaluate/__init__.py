"""Downstream evaluation (SPEC section 7)."""
