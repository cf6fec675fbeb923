"""Dataset formats shared by training and evaluation (imports nothing else of smolvlm's)."""
