"""The named recipes (``*.toml``) that ``vlkit train --recipe NAME`` runs; see
``vlkit/train/recipe.py`` for the format and ``vlkit recipes`` for the list."""
