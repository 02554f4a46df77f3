"""iunet_nb.notebook."""
