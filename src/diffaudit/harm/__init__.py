"""Harm tasks: image pairs with a known dense correspondence, on which matching of the features is scored."""
