"""The product's own error types: each message names the bad value and the fix."""


class SoupError(ValueError):
    """A problem with the inputs or the run of a souping method."""


class IngredientError(SoupError):
    """An ingredient file, or the set of ingredients, cannot be used."""
