"""persona package."""
