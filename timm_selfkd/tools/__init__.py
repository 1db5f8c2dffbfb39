"""Developer tools of timm-selfkd (run from a checkout of the repository)."""
