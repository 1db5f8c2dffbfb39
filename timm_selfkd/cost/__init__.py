"""What a self-KD method costs on your model and device: `python -m timm_selfkd.cost` (`command`), measured by one
core (`measure`) that `benchmarks/overhead.py` shares; `footprint` reads a method's kept state and reading pattern,
`report` turns the measurements into the table and the JSON record."""
