"""`python -m timm_selfkd.cost`: see `timm_selfkd.cost.command`."""
from timm_selfkd.cost.command import main

main()
